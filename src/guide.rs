//! The long form, for docs.rs: the pages of the repository's `docs/`
//! directory (one source for both; links between pages work on GitHub).

#[doc = include_str!("../docs/selection.md")]
pub mod selection {}

#[doc = include_str!("../docs/guarantees.md")]
pub mod guarantees {}

#[doc = include_str!("../docs/known-limits.md")]
pub mod known_limits {}

#[doc = include_str!("../docs/proxy-modes.md")]
pub mod proxy_modes {}
