//! Reading an `on-events` batch (WIT 0.5.0): each event's `from`, `to`,
//! `name` and `payload` follow one another in one byte buffer, at the
//! lengths its head gives. Shared by the Rust SDK (whose public [`Event`]
//! this is) and the Lua guest (which includes this file), and by the
//! host's tests of the layout it writes.

/// An event as a script receives it: its strings and payload borrowed from
/// the batch the host delivered, valid for the callback. Reading one
/// allocates nothing; `Event::to_message` (in the SDK) makes an owned copy
/// to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event<'a> {
    /// Unique among the messages of its sender node.
    pub id: u64,
    /// Name of the node the event was sent from.
    pub from: &'a str,
    /// `*`: events are broadcast.
    pub to: &'a str,
    /// The event name, e.g. `temperature`.
    pub name: &'a str,
    pub payload: &'a [u8],
    /// When the sender made it, in ms since the Unix epoch.
    pub timestamp_ms: u64,
}

/// What the reader needs of an event's head. Each crate's bindings
/// generate their own `event-head` type, so each implements this for it.
pub trait Head {
    fn id(&self) -> u64;
    fn timestamp_ms(&self) -> u64;
    /// `[from-len, to-len, name-len, payload-len]`, in bytes.
    fn lens(&self) -> [u32; 4];
}

/// The bindings' side of a batch, for a crate whose bindings generate
/// `$head` (`event-head`) and `$message` (`message`) from the WIT: reading
/// a head, and an event borrowed from a lifted message. Each crate that
/// includes this file has its own generated types, so each says this once,
/// naming this module as it is in scope there (`$batch`).
macro_rules! impl_for_bindings {
    ($batch:ident, $head:ty, $message:ty) => {
        impl $batch::Head for $head {
            fn id(&self) -> u64 {
                self.id
            }
            fn timestamp_ms(&self) -> u64 {
                self.timestamp_ms
            }
            fn lens(&self) -> [u32; 4] {
                [self.from_len, self.to_len, self.name_len, self.payload_len]
            }
        }

        impl<'a> From<&'a $message> for $batch::Event<'a> {
            fn from(m: &'a $message) -> Self {
                $batch::Event {
                    id: m.id,
                    from: &m.from,
                    to: &m.to,
                    name: &m.name,
                    payload: &m.payload,
                    timestamp_ms: m.timestamp_ms,
                }
            }
        }
    };
}
#[allow(unused_imports)] // the host includes this file for tests only
pub(crate) use impl_for_bindings;

/// Walks a batch's bytes, one event at a time.
pub struct Split<'a> {
    bytes: &'a [u8],
}

impl<'a> Split<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Split { bytes }
    }

    /// The event `head` describes, its fields taken from the front of the
    /// remaining bytes. An error if they run past the end of the buffer or
    /// a string is not UTF-8 (the host never sends either; a guest does
    /// not trust that blindly).
    pub fn next(&mut self, head: &impl Head) -> Result<Event<'a>, String> {
        let lens = head.lens();
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
        Ok(Event {
            id: head.id(),
            from: text(f)?,
            to: text(t)?,
            name: text(n)?,
            payload,
            timestamp_ms: head.timestamp_ms(),
        })
    }
}

/// Every event of a batch in order, borrowed from `bytes` (one `Vec` per
/// batch, nothing per event). A malformed event ends the walk: the events
/// before it are returned with an error that says what was wrong and how
/// many events were lost.
pub fn collect<'a>(heads: &[impl Head], bytes: &'a [u8]) -> (Vec<Event<'a>>, Result<(), String>) {
    let mut events = Vec::with_capacity(heads.len());
    let mut split = Split::new(bytes);
    for (i, h) in heads.iter().enumerate() {
        match split.next(h) {
            Ok(e) => events.push(e),
            Err(e) => {
                let lost = heads.len() - i;
                return (
                    events,
                    Err(format!("{e}; the batch's last {lost} events dropped")),
                );
            }
        }
    }
    (events, Ok(()))
}
