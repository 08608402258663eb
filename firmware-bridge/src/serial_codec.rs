//! Frames on a byte stream (a serial line): `COBS(frame | CRC-32 LE) | 0x00`.
//!
//! COBS leaves no zero byte inside an encoded frame, so `0x00` marks frame
//! ends and a receiver that starts mid-stream, or sees a garbled byte,
//! loses at most the frame it is in. The CRC (IEEE CRC-32, as zlib's)
//! tells a garbled frame from a forged one before the tag is computed.

/// Encode one frame for the line, delimiter included.
pub fn encode(frame: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(frame.len() + 4);
    raw.extend_from_slice(frame);
    raw.extend_from_slice(&crc32fast::hash(frame).to_le_bytes());
    let mut out = cobs::encode_vec(&raw);
    out.push(0);
    out
}

/// What came off the line.
#[derive(Debug, PartialEq, Eq)]
pub enum Unframed {
    Frame(Vec<u8>),
    /// Bytes that were not a frame: bad COBS, too long, or a CRC mismatch.
    Garbage(crate::proto::Reject),
}

/// Splits a byte stream into frames. Memory is bounded: bytes past
/// `max_frame` (plus COBS and CRC overhead) are discarded up to the next
/// delimiter.
pub struct Decoder {
    buf: Vec<u8>,
    limit: usize,
    overflow: bool,
}

impl Decoder {
    pub fn new(max_frame: usize) -> Self {
        // COBS adds one byte per 254, the CRC four.
        let limit = max_frame + 4 + max_frame / 254 + 2;
        Decoder {
            buf: Vec::with_capacity(limit.min(4096)),
            limit,
            overflow: false,
        }
    }

    /// Feed bytes; every complete frame (or garbage run) is handed to `out`.
    pub fn push(&mut self, bytes: &[u8], mut out: impl FnMut(Unframed)) {
        for &b in bytes {
            if b != 0 {
                if self.buf.len() < self.limit {
                    self.buf.push(b);
                } else {
                    self.overflow = true;
                }
                continue;
            }
            let overflow = std::mem::take(&mut self.overflow);
            if self.buf.is_empty() && !overflow {
                // Idle delimiters: a sender may flush with extra zeros.
                continue;
            }
            let item = if overflow {
                Unframed::Garbage(crate::proto::Reject::Oversized)
            } else {
                unframe(&self.buf)
            };
            self.buf.clear();
            out(item);
        }
    }
}

fn unframe(encoded: &[u8]) -> Unframed {
    use crate::proto::Reject;
    let Ok(raw) = cobs::decode_vec(encoded) else {
        return Unframed::Garbage(Reject::Framing);
    };
    if raw.len() < 4 {
        return Unframed::Garbage(Reject::Framing);
    }
    let (frame, crc) = raw.split_at(raw.len() - 4);
    if crc32fast::hash(frame).to_le_bytes() != crc {
        return Unframed::Garbage(Reject::Crc);
    }
    Unframed::Frame(frame.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Reject;

    fn collect(d: &mut Decoder, bytes: &[u8]) -> Vec<Unframed> {
        let mut v = Vec::new();
        d.push(bytes, |u| v.push(u));
        v
    }

    #[test]
    fn frames_survive_any_split_and_zero_bytes_inside() {
        let frames: Vec<Vec<u8>> = vec![vec![0; 300], (0..=255).collect(), vec![1, 2, 3]];
        let line: Vec<u8> = frames.iter().flat_map(|f| encode(f)).collect();
        for chunk in [1, 2, 7, 64, line.len()] {
            let mut d = Decoder::new(512);
            let got: Vec<Unframed> = line
                .chunks(chunk)
                .flat_map(|c| collect(&mut d, c))
                .collect();
            let want: Vec<Unframed> = frames.iter().cloned().map(Unframed::Frame).collect();
            assert_eq!(got, want, "chunk {chunk}");
        }
    }

    #[test]
    fn a_garbled_byte_costs_one_frame_not_the_line() {
        let mut line = encode(b"first frame");
        let second = line.len();
        line.extend(encode(b"second frame"));
        line.extend(encode(b"third frame"));
        line[second + 3] ^= 0x40;
        let mut d = Decoder::new(512);
        let got = collect(&mut d, &line);
        assert_eq!(got[0], Unframed::Frame(b"first frame".to_vec()));
        assert!(matches!(
            got[1],
            Unframed::Garbage(Reject::Crc | Reject::Framing)
        ));
        assert_eq!(got[2], Unframed::Frame(b"third frame".to_vec()));
    }

    #[test]
    fn line_noise_and_overlong_runs_are_bounded_and_reported() {
        let mut d = Decoder::new(64);
        let mut line = vec![0x55; 10_000];
        line.push(0);
        line.extend(encode(b"ok"));
        let got = collect(&mut d, &line);
        assert_eq!(got[0], Unframed::Garbage(Reject::Oversized));
        assert_eq!(got[1], Unframed::Frame(b"ok".to_vec()));
        assert!(d.buf.capacity() < 4096);
        // Starting mid-frame: the tail of a frame, then a good one.
        let mut d = Decoder::new(64);
        let enc = encode(b"hello");
        let mut line = enc[3..].to_vec();
        line.extend(encode(b"next"));
        let got = collect(&mut d, &line);
        assert!(matches!(got[0], Unframed::Garbage(_)));
        assert_eq!(got[1], Unframed::Frame(b"next".to_vec()));
    }
}
