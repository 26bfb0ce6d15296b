//! Random identifiers for new images (VHD unique id, VHDX GUIDs).

use crate::error::{Error, Result};

/// 16 random bytes shaped as an RFC 4122 version-4 UUID (in big-endian field order).
pub fn random_uuid() -> Result<[u8; 16]> {
    let mut b = [0u8; 16];
    random_bytes(&mut b)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(b)
}

/// Fills `buf` from the kernel's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    let mut f =
        std::fs::File::open("/dev/urandom").map_err(|e| Error::io("opening /dev/urandom", e))?;
    f.read_exact(buf)
        .map_err(|e| Error::io("reading /dev/urandom", e))
}

/// Formats 16 bytes (big-endian field order) as `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
pub fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8).unwrap_or_default(),
        h.get(8..12).unwrap_or_default(),
        h.get(12..16).unwrap_or_default(),
        h.get(16..20).unwrap_or_default(),
        h.get(20..32).unwrap_or_default()
    )
}

/// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (braces optional, any case) into 16 bytes in
/// big-endian field order.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let s = s.trim().trim_start_matches('{').trim_end_matches('}');
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let u = random_uuid().unwrap();
        assert_eq!(parse_uuid(&format_uuid(&u)), Some(u));
        assert_eq!(
            parse_uuid("{2DC27766-F623-4200-9D64-115E9BFD4A08}").map(|b| format_uuid(&b)),
            Some("2dc27766-f623-4200-9d64-115e9bfd4a08".to_string())
        );
        assert_eq!(parse_uuid("xyz"), None);
    }
}
