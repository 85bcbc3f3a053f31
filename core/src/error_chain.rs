//! An error and its sources as one line of text, each fact once.
//!
//! Many errors here already put their source in their own message
//! (`{path}: {source}`), and some say little at the top level (hyper, TLS
//! and io errors), so neither the top message alone nor every source
//! appended (anyhow's `{:#}`) reads right: the first loses detail, the
//! second prints `join token: join token must be …: join token must be …`.

/// `err` and its sources joined with `": "`, skipping a source whose text
/// the line already contains.
///
/// ```
/// #[derive(Debug, thiserror::Error)]
/// #[error("reading x: {0}")]
/// struct Outer(#[source] std::io::Error);
/// let e = Outer(std::io::Error::other("denied"));
/// assert_eq!(fleetcmd_core::error_chain::error_chain(&e), "reading x: denied");
/// ```
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
