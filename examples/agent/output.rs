//! What the agent prints: status lines on stdout, warnings and errors on
//! stderr, each exactly one line.

use std::io::Write;

/// One line on stdout, flushed at once (stdout is a pipe under supervisors).
pub(crate) fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}

pub(crate) fn warn(msg: &str) {
    eprintln!("agent: warning: {}", flatten(msg));
}

/// An error and its causes as one line: `outer: cause: root cause`,
/// skipping causes the outer messages already quote.
pub(crate) fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let msg = flatten(&cause.to_string());
        if msg.is_empty() || out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Multi-line text (a verifier log, say) folded onto one line.
fn flatten(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" | ")
}
