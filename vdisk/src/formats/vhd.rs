//! vhd glue: owned by the vhd crate's work.

use blockdev::{BlockDevice, Error, ImageWriter, Result, Storage};

use super::{CreateSpec, OpenCtx};

pub(crate) fn open(_storage: Box<dyn Storage>, _ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("vhd images are not supported yet"))
}

pub(crate) fn create(_storage: Box<dyn Storage>, _spec: &CreateSpec<'_>) -> Result<()> {
    Err(Error::unsupported(
        "creating vhd images is not supported yet",
    ))
}

pub(crate) fn writer(
    _storage: Box<dyn Storage>,
    _spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing vhd images is not supported yet",
    ))
}
