//! The block allocation table.

pub(crate) mod table;
