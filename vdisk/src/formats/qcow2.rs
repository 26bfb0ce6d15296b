//! qcow2 glue: owned by the qcow2 crate's work.

use blockdev::{BlockDevice, Error, ImageWriter, Result, Storage};

use super::{CreateSpec, OpenCtx};

pub(crate) fn open(_storage: Box<dyn Storage>, _ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    Err(Error::unsupported("qcow2 images are not supported yet"))
}

pub(crate) fn create(_storage: Box<dyn Storage>, _spec: &CreateSpec<'_>) -> Result<()> {
    Err(Error::unsupported(
        "creating qcow2 images is not supported yet",
    ))
}

pub(crate) fn writer(
    _storage: Box<dyn Storage>,
    _spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    Err(Error::unsupported(
        "writing qcow2 images is not supported yet",
    ))
}
