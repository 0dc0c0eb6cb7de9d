//! How the examples report an error: the error, then each of its causes
//! (the crate's `Display` shows an error alone; the errno is its source).

pub fn print_error(who: &str, err: &dyn std::error::Error) {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    eprintln!("{who}: {text}");
}
