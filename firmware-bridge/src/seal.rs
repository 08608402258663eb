//! Sealed sessions: frames encrypted and authenticated with
//! ChaCha20-Poly1305 (RFC 8439), negotiated in hello (`PROTOCOL.md`,
//! "Sealed sessions"). Anyone on the device's network sees a frame's
//! header and size, never its body.
//!
//! Each direction has its own key, `HMAC-SHA256(device key, "covey-seal" ‖
//! dir ‖ client nonce ‖ session nonce)`: new for every session, so a
//! sequence number is never used twice under one key (the nonce is
//! `0^8 ‖ seq`; a retransmission repeats the same bytes). The header is
//! the associated data; the 16-byte Poly1305 tag takes the HMAC tag's
//! place.

use ring::aead::{self, Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
use ring::hmac;

use crate::proto::{Dir, HEADER_LEN, KEY_LEN, MIN_FRAME, NONCE_LEN, TAG_LEN};

/// Feature bit in hello and welcome: sealed frames.
pub const FEATURE_SEAL: u8 = 0x01;

/// One session's two keys.
pub struct SealKeys {
    to_bridge: LessSafeKey,
    to_device: LessSafeKey,
}

impl std::fmt::Debug for SealKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKeys")
    }
}

impl SealKeys {
    pub fn derive(
        device_key: &[u8; KEY_LEN],
        client_nonce: &[u8; NONCE_LEN],
        session_nonce: &[u8; NONCE_LEN],
    ) -> SealKeys {
        let hmac_key = hmac::Key::new(hmac::HMAC_SHA256, device_key);
        let one = |dir: Dir| {
            let mut ctx = hmac::Context::with_key(&hmac_key);
            ctx.update(b"covey-seal");
            ctx.update(&[dir.byte()]);
            ctx.update(client_nonce);
            ctx.update(session_nonce);
            let k = ctx.sign();
            let unbound = UnboundKey::new(&CHACHA20_POLY1305, k.as_ref()).expect("32-byte key");
            LessSafeKey::new(unbound)
        };
        SealKeys {
            to_bridge: one(Dir::DeviceToBridge),
            to_device: one(Dir::BridgeToDevice),
        }
    }

    fn key(&self, dir: Dir) -> &LessSafeKey {
        match dir {
            Dir::DeviceToBridge => &self.to_bridge,
            Dir::BridgeToDevice => &self.to_device,
        }
    }

    /// Seal `frame` (header, plain body, and room for the tag at the end,
    /// as [`crate::proto::encode`] makes it) in place.
    pub fn seal(&self, dir: Dir, frame: &mut [u8]) {
        let (head, rest) = frame.split_at_mut(HEADER_LEN);
        let (body, tag_out) = rest.split_at_mut(rest.len() - TAG_LEN);
        let tag = self
            .key(dir)
            .seal_in_place_separate_tag(nonce(head), Aad::from(&*head), body)
            .expect("frames are far below ChaCha20's limit");
        tag_out.copy_from_slice(tag.as_ref());
    }

    /// Open a sealed frame: the frame with its body in clear (the tag's
    /// bytes left as they were), or none if it does not authenticate.
    pub fn open(&self, dir: Dir, frame: &[u8]) -> Option<Vec<u8>> {
        if frame.len() < MIN_FRAME {
            return None;
        }
        let mut out = frame.to_vec();
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let plain_len = rest.len() - TAG_LEN;
        // `open_in_place` wants ciphertext ‖ tag and leaves the plaintext
        // at the start.
        self.key(dir)
            .open_in_place(nonce(head), Aad::from(&*head), rest)
            .ok()?;
        debug_assert!(plain_len <= rest.len());
        Some(out)
    }
}

/// `0^8 ‖ seq`: the sequence number of the header (offset 3).
fn nonce(head: &[u8]) -> Nonce {
    let mut n = [0u8; aead::NONCE_LEN];
    n[8..].copy_from_slice(&head[3..7]);
    Nonce::assume_unique_for_key(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8439 §2.8.2: ring's ChaCha20-Poly1305 is the one specified (the
    /// C library checks the same vector in `covey-device selftest`).
    #[test]
    fn rfc8439_aead_vector() {
        let key: Vec<u8> = (0x80..=0x9f).collect();
        let nonce = hex("07000000 40414243 44454647");
        let aad = hex("50515253 c0c1c2c3 c4c5c6c7");
        let plain = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let want_ct = hex(
            "d31a8d34648e60db7b86afbc53ef7ec2 a4aded51296e08fea9e2b5a736ee62d6
             3dbea45e8ca9671282fafb69da92728b 1a71de0a9e060b2905d6a5b67ecd3b36
             92ddbd7f2d778b8c9803aee328091b58 fab324e4fad675945585808b4831d7bc
             3ff4def08e4b7a9de576d26586cec64b 6116",
        );
        let want_tag = hex("1ae10b594f09e26a7e902ecbd0600691");
        let k = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).unwrap());
        let mut buf = plain.to_vec();
        let n = Nonce::try_assume_unique_for_key(&nonce).unwrap();
        let tag = k
            .seal_in_place_separate_tag(n, Aad::from(&aad), &mut buf)
            .unwrap();
        assert_eq!(buf, want_ct);
        assert_eq!(tag.as_ref(), &want_tag[..]);
    }

    #[test]
    fn sealed_frames_round_trip_and_refuse_tampering() {
        let keys = SealKeys::derive(&[7; 32], &[1; 8], &[2; 8]);
        let mut frame = vec![1, 5, 0, 0, 0, 0, 9];
        frame.extend_from_slice(b"\x00\x04tempsecret payload");
        frame.extend_from_slice(&[0; TAG_LEN]);
        let plain = frame.clone();
        keys.seal(Dir::DeviceToBridge, &mut frame);
        assert!(
            !frame.windows(6).any(|w| w == b"secret"),
            "the body is hidden"
        );
        let opened = keys.open(Dir::DeviceToBridge, &frame).unwrap();
        assert_eq!(
            opened[..plain.len() - TAG_LEN],
            plain[..plain.len() - TAG_LEN]
        );
        // The other direction's key, another session's, a flipped bit
        // anywhere (the header is authenticated too).
        assert!(keys.open(Dir::BridgeToDevice, &frame).is_none());
        let other = SealKeys::derive(&[7; 32], &[1; 8], &[3; 8]);
        assert!(other.open(Dir::DeviceToBridge, &frame).is_none());
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            assert!(keys.open(Dir::DeviceToBridge, &bad).is_none(), "byte {i}");
        }
    }
}
