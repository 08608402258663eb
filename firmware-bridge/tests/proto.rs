//! The frame format: every body round-trips, tags bind key, nonce and
//! direction, malformed input is refused before anything acts on it.

use covey_firmware_bridge::proto::*;
fn k() -> ring::hmac::Key {
    key(&[7u8; KEY_LEN])
}

#[test]
fn every_body_round_trips_and_verifies() {
    let nonce = [9u8; NONCE_LEN];
    let bodies = [
        Body::Hello {
            client_nonce: [1; 8],
            max_frame: 512,
            ping_interval_s: 10,
            name: "esp-1",
            features: 1,
        },
        Body::Welcome {
            client_nonce: [1; 8],
            session_nonce: [2; 8],
            max_frame: 512,
            session_timeout_s: 30,
            node: "kitchen",
            features: 1,
        },
        Body::Subscribe {
            from: "*",
            name: "temp.*",
        },
        Body::Unsubscribe {
            from: "a",
            name: "b",
        },
        Body::Event {
            from: "",
            name: "temp",
            payload: b"21.5",
        },
        Body::Command {
            peer: "kitchen/lua",
            name: "blink",
            payload: b"",
        },
        Body::Call {
            call_id: 7,
            from: "x",
            name: "read",
            payload: b"\0\xff",
        },
        Body::Reply {
            call_id: 7,
            ok: false,
            payload: b"no",
        },
        Body::Ack { seq: 5, status: 3 },
        Body::Ping,
        Body::Pong,
        Body::Reset { reason: 1 },
    ];
    for (i, b) in bodies.iter().enumerate() {
        let f = encode(&k(), Dir::DeviceToBridge, &nonce, FLAG_ACK, i as u32, b);
        let h = header(&f, 512).unwrap();
        assert_eq!(h.seq, i as u32);
        assert_eq!(h.flags, FLAG_ACK);
        assert!(verify(&k(), Dir::DeviceToBridge, &nonce, &f));
        assert!(
            !verify(&k(), Dir::BridgeToDevice, &nonce, &f),
            "direction is bound"
        );
        assert!(
            !verify(&k(), Dir::DeviceToBridge, &[0; 8], &f),
            "nonce is bound"
        );
        assert_eq!(&body(&f).unwrap(), b);
    }
}

#[test]
fn a_flipped_bit_anywhere_fails_the_tag() {
    let nonce = [3u8; NONCE_LEN];
    let f = encode(
        &k(),
        Dir::DeviceToBridge,
        &nonce,
        0,
        1,
        &Body::Event {
            from: "",
            name: "t",
            payload: b"1",
        },
    );
    for i in 0..f.len() {
        let mut g = f.clone();
        g[i] ^= 0x10;
        assert!(!verify(&k(), Dir::DeviceToBridge, &nonce, &g), "byte {i}");
    }
}

#[test]
fn short_long_and_foreign_frames_are_rejected_before_the_tag() {
    assert_eq!(header(&[1; 22], 512), Err(Reject::Truncated));
    assert_eq!(header(&[1; 513], 512), Err(Reject::Oversized));
    assert_eq!(header(&[2; 30], 512), Err(Reject::Version));
    let mut f = vec![VERSION, 0x7f, 0, 0, 0, 0, 1];
    f.extend_from_slice(&[0; TAG_LEN]);
    assert_eq!(body(&f), Err(Reject::UnknownType));
    // A string length past the end of the body.
    let mut f = vec![VERSION, T_SUBSCRIBE, 0, 0, 0, 0, 1, 200, b'a'];
    f.extend_from_slice(&[0; TAG_LEN]);
    assert_eq!(body(&f), Err(Reject::Malformed));
    // Trailing bytes after a fixed body.
    let mut f = vec![VERSION, T_PING, 0, 0, 0, 0, 1, 0];
    f.extend_from_slice(&[0; TAG_LEN]);
    assert_eq!(body(&f), Err(Reject::Malformed));
}

#[test]
fn device_names_follow_the_node_rule() {
    for ok in ["esp-1", "a", "kitchen_2.b"] {
        assert!(valid_device_name(ok), "{ok}");
    }
    for bad in ["", ".x", "a/b", "a b", &"x".repeat(64), "é"] {
        assert!(!valid_device_name(bad), "{bad}");
    }
}
