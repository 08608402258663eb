//! Text from elsewhere (a peer, a script, a device) made safe for a log
//! line (a leaf: every layer may use it).

/// `text` for a log line: at most 120 characters, control characters
/// escaped.
pub fn for_log(text: &str) -> String {
    let mut s: String = text
        .chars()
        .take(120)
        .collect::<String>()
        .escape_debug()
        .collect();
    if text.chars().count() > 120 {
        s.push('…');
    }
    s
}
