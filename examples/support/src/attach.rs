//! The examples' attach: the default splice guard where the kernel allows
//! it, else without it, saying so. The examples' own traffic never splices;
//! a service of yours should not fall back silently like this.

use sockmap_fastpath::{AcceleratorBuilder, Error, FastpathGuard, SpliceGuard};

pub fn attach_or_without_splice_guard(
    builder: AcceleratorBuilder,
    who: &str,
) -> Result<FastpathGuard, Error> {
    match builder.clone().attach() {
        Err(err) if err.is_splice_guard_refused() => {
            let err = err.with_causes();
            eprintln!("{who}: {err}\n{who}: continuing WITHOUT the splice guard (this program does not splice)");
            builder.splice_guard(SpliceGuard::Off).attach()
        }
        other => other,
    }
}
