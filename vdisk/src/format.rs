//! Format names.

use std::fmt;
use std::str::FromStr;

use blockdev::Error;

/// The image formats vdconv reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// The guest disk byte for byte.
    Raw,
    /// Virtual PC / Hyper-V / Xen / Azure VHD.
    Vhd,
    /// Hyper-V VHDX (and .avhdx checkpoints).
    Vhdx,
    /// qemu/KVM qcow2.
    Qcow2,
}

impl Format {
    /// The canonical name.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Qcow2 => "qcow2",
        }
    }

    /// The usual file extension.
    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            Format::Vhd => "vhd",
            Format::Vhdx => "vhdx",
            Format::Qcow2 => "qcow2",
        }
    }

    /// Every format.
    pub const ALL: [Format; 4] = [Format::Raw, Format::Vhd, Format::Vhdx, Format::Qcow2];
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Format {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.to_ascii_lowercase().as_str() {
            "raw" | "img" => Ok(Format::Raw),
            "vhd" | "vpc" => Ok(Format::Vhd),
            "vhdx" | "avhdx" => Ok(Format::Vhdx),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(Error::invalid_argument(format!(
                "unknown format '{other}' (expected raw, vhd, vpc, vhdx or qcow2)"
            ))),
        }
    }
}
