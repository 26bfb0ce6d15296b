//! In-place writes: cluster allocation in crash-safe order (see `hostile-inputs.md` §3.1).

use blockdev::{Error, Limits, Result, Storage};

use crate::header::Header;
use crate::image::Qcow2Image;

/// Allocation state of a writable image, behind the image's allocation mutex.
#[derive(Debug, Default)]
pub struct AllocState {}

impl AllocState {
    pub(crate) fn new(_storage: &dyn Storage, _h: &Header, _limits: &Limits) -> Result<Self> {
        Ok(AllocState {})
    }
}

impl Qcow2Image {
    pub(crate) fn write_impl(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::read_only("not yet"))
    }

    pub(crate) fn write_zeroes_impl(&self, _offset: u64, _len: u64, _d: bool) -> Result<()> {
        Err(Error::read_only("not yet"))
    }
}
