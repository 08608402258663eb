//! Reading an `on-events` batch (WIT 0.5.0): each event's `from`, `to`,
//! `name` and `payload` follow one another in one byte buffer, at the
//! lengths its head gives. Shared by the Rust SDK and the Lua guest (which
//! includes this file), and by the host's tests of the layout it writes.

/// One event's variable-size fields, borrowed from the batch's bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Fields<'a> {
    pub from: &'a str,
    pub to: &'a str,
    pub name: &'a str,
    pub payload: &'a [u8],
}

/// Walks a batch's bytes, one event at a time.
pub struct Split<'a> {
    bytes: &'a [u8],
}

impl<'a> Split<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Split { bytes }
    }

    /// The next event's fields, given its head's
    /// `[from-len, to-len, name-len, payload-len]`. An error if they run
    /// past the end of the buffer or a string is not UTF-8 (the host never
    /// sends either; a guest does not trust that blindly).
    pub fn next(&mut self, lens: [u32; 4]) -> Result<Fields<'a>, String> {
        let [from, to, name, payload] = lens.map(|n| n as usize);
        let total = (from.checked_add(to))
            .and_then(|n| n.checked_add(name))
            .and_then(|n| n.checked_add(payload))
            .filter(|&n| n <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "an event's fields ({lens:?} bytes) run past the batch's {} remaining bytes",
                    self.bytes.len()
                )
            })?;
        let (event, rest) = self.bytes.split_at(total);
        self.bytes = rest;
        let (f, event) = event.split_at(from);
        let (t, event) = event.split_at(to);
        let (n, payload) = event.split_at(name);
        let text = |b| core::str::from_utf8(b).map_err(|e| format!("an event's string: {e}"));
        Ok(Fields {
            from: text(f)?,
            to: text(t)?,
            name: text(n)?,
            payload,
        })
    }
}

/// Every event of a batch in order: `each(head, fields)`, with the fields
/// at the lengths `lens(head)` gives. A malformed event ends the walk; the
/// error says what was wrong and how many events were lost.
pub fn read<'a, H>(
    heads: &[H],
    lens: impl Fn(&H) -> [u32; 4],
    bytes: &'a [u8],
    mut each: impl FnMut(&H, Fields<'a>),
) -> Result<(), String> {
    let mut split = Split::new(bytes);
    for (i, h) in heads.iter().enumerate() {
        let lost = heads.len() - i;
        let fields = (split.next(lens(h)))
            .map_err(|e| format!("{e}; the batch's last {lost} events dropped"))?;
        each(h, fields);
    }
    Ok(())
}
