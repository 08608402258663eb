//! esc-style name patterns: `*` alone matches anything, `*` inside a pattern
//! matches any run of characters, every other character matches itself.

/// The system events' prefix (`covey_lifecycle::PREFIX`, which a host
/// test holds this to). Spelled here because the Lua guest compiles this
/// file too, and a path dependency outside its workspace would make its
/// build depend on where the checkout is (cargo hashes such paths).
pub const RESERVED_PREFIX: &str = "covey.";

/// A compiled pattern. Cheap to match; the common cases (`*` and literal
/// names) avoid the general matcher entirely.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    Any,
    Exact(String),
    Glob(String),
}

impl Pattern {
    pub fn new(text: &str) -> Self {
        if text == "*" {
            Pattern::Any
        } else if text.contains('*') {
            Pattern::Glob(text.to_string())
        } else {
            Pattern::Exact(text.to_string())
        }
    }

    pub fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(p) => p == s,
            Pattern::Glob(p) => glob_match(p.as_bytes(), s.as_bytes()),
        }
    }

    /// Does this name pattern select the event named `name`? As
    /// [`Pattern::matches`], except that system events (`covey.*`) are
    /// selected only by a pattern that spells the prefix out
    /// (`covey.node.*`, not `*`): a catch-all written before system events
    /// existed does not start receiving them (as NATS' wildcards skip
    /// `$SYS`).
    pub fn selects(&self, name: &str) -> bool {
        self.matches(name)
            && (!name.starts_with(RESERVED_PREFIX)
                || matches!(self, Pattern::Exact(p) | Pattern::Glob(p)
                    if p.starts_with(RESERVED_PREFIX)))
    }
}

/// Iterative wildcard matching with single backtrack point: linear in
/// practice, never exponential.
fn glob_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if pi < p.len() && p[pi] == s[si] {
            pi += 1;
            si += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::Pattern;

    #[test]
    fn system_events_only_for_patterns_that_name_them() {
        assert_eq!(super::RESERVED_PREFIX, covey_lifecycle::PREFIX);
        assert!(Pattern::new("*").selects("temp"));
        assert!(!Pattern::new("*").selects("covey.node.down"));
        assert!(!Pattern::new("*.down").selects("covey.node.down"));
        assert!(Pattern::new("covey.*").selects("covey.node.down"));
        assert!(Pattern::new("covey.node.down").selects("covey.node.down"));
        assert!(!Pattern::new("covey.node.up").selects("covey.node.down"));
    }

    #[test]
    fn star_matches_everything() {
        assert!(Pattern::new("*").matches(""));
        assert!(Pattern::new("*").matches("hello"));
    }

    #[test]
    fn literal_matches_only_itself() {
        assert!(Pattern::new("hello").matches("hello"));
        assert!(!Pattern::new("hello").matches("hello2"));
        assert!(!Pattern::new("hello").matches("hell"));
    }

    #[test]
    fn globs() {
        let p = Pattern::new("sensor.*");
        assert!(p.matches("sensor.temp"));
        assert!(p.matches("sensor."));
        assert!(!p.matches("sensors.temp"));
        let p = Pattern::new("*.temp");
        assert!(p.matches("kitchen.temp"));
        assert!(!p.matches("kitchen.tempx"));
        let p = Pattern::new("a*b*c");
        assert!(p.matches("abc"));
        assert!(p.matches("aXXbYYc"));
        assert!(!p.matches("aXXbYY"));
        assert!(Pattern::new("a**").matches("a"));
    }
}
