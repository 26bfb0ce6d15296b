//! Raw images.

use blockdev::{BlockDevice, Error, ImageWriter, RawImage, RawWriter, Result, Storage};

use super::{check_known_options, CreateSpec, OpenCtx};
use crate::format::Format;

pub(crate) fn open(storage: Box<dyn Storage>, _ctx: &OpenCtx<'_>) -> Result<Box<dyn BlockDevice>> {
    Ok(Box::new(RawImage::open(storage)?))
}

pub(crate) fn create(storage: Box<dyn Storage>, spec: &CreateSpec<'_>) -> Result<()> {
    check_known_options(Format::Raw, spec.options, &[])?;
    if spec.parent.is_some() {
        return Err(Error::invalid_argument(
            "raw images cannot have a backing file",
        ));
    }
    RawImage::create(storage, spec.size)?;
    Ok(())
}

pub(crate) fn writer(
    storage: Box<dyn Storage>,
    spec: &CreateSpec<'_>,
) -> Result<Box<dyn ImageWriter>> {
    check_known_options(Format::Raw, spec.options, &[])?;
    if spec.parent.is_some() {
        return Err(Error::invalid_argument(
            "raw images cannot have a backing file",
        ));
    }
    Ok(Box::new(RawWriter::new(storage, spec.size)?))
}
