//! Tests across modules: a small federation whose nodes seal frames to each other through
//! an imagined coordinator that tampers, replays, reorders, splices and forges. Each test
//! names the defence it exercises and fails if that defence is removed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;

use crate::*;

const NOW: u64 = 1_764_633_600_000;
const DAY: u64 = 86_400_000;
const FED: &str = "synthetic-ics";

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn entry(node: &NodeIdentity) -> RegistryEntry {
    RegistryEntry {
        node: node.public().clone(),
        valid_from_ms: NOW - DAY,
        valid_until_ms: NOW + 365 * DAY,
    }
}

/// The IG leads' key, three registered nodes and one outsider.
struct Fed {
    registry_key: SigningKey,
    a: NodeIdentity,
    b: NodeIdentity,
    c: NodeIdentity,
    outsider: NodeIdentity,
    registry: Registry,
    verified: VerifiedRegistry,
}

fn fed() -> Fed {
    let registry_key = SigningKey::from_bytes(&[7; 32]);
    let a = NodeIdentity::generate(id("RW2")).unwrap();
    let b = NodeIdentity::generate(id("A81001")).unwrap();
    let c = NodeIdentity::generate(id("RY4")).unwrap();
    let outsider = NodeIdentity::generate(id("ZZ999")).unwrap();
    let mut registry = Registry::new(
        FED,
        1,
        NOW + 30 * DAY,
        vec![entry(&a), entry(&b), entry(&c)],
    );
    registry.sign(&registry_key).unwrap();
    let verified = registry.verify(&registry_key.verifying_key(), NOW).unwrap();
    Fed {
        registry_key,
        a,
        b,
        c,
        outsider,
        registry,
        verified,
    }
}

fn ctx(session: u8) -> SessionContext {
    SessionContext {
        protocol: Protocol::Link,
        federation_id: FED.into(),
        query_digest: [1; 32],
        session_id: [session; 32],
        first_round: 1,
        last_round: 2,
    }
}

fn header(from: &NodeIdentity, to: &NodeIdentity, round: u32, seq: u32, last: bool) -> Header {
    let c = ctx(9);
    Header {
        protocol: c.protocol,
        federation_id: c.federation_id,
        query_digest: c.query_digest,
        session_id: c.session_id,
        from: from.node_id().clone(),
        to: to.node_id().clone(),
        round,
        seq,
        last,
    }
}

/// One frame A → B.
fn frame_a_to_b(f: &Fed, body: &[u8]) -> SealedFrame {
    seal(&f.a, f.b.public(), header(&f.a, &f.b, 1, 0, false), body).unwrap()
}

// ---------------------------------------------------------------------------------------
// seal / open

#[test]
fn a_frame_round_trips_and_only_the_header_is_readable() {
    let f = fed();
    let body = b"F = shuffle({b.H(y)} ...)";
    let frame = frame_a_to_b(&f, body);
    assert!(
        !frame.ciphertext().windows(body.len()).any(|w| w == body),
        "the coordinator can read the body"
    );
    let (h, plaintext) = open(&f.b, &f.verified, &frame).unwrap();
    assert_eq!(h, *frame.header());
    assert_eq!(plaintext.as_slice(), body);
    // Empty messages work too (an empty `last` frame ends a round with nothing to say).
    let empty = seal(&f.a, f.b.public(), header(&f.a, &f.b, 1, 0, true), b"").unwrap();
    assert!(open(&f.b, &f.verified, &empty).unwrap().1.is_empty());
}

#[test]
fn a_frame_is_refused_by_anyone_but_its_recipient() {
    let f = fed();
    let frame = frame_a_to_b(&f, b"for B only");
    assert_eq!(
        open(&f.c, &f.verified, &frame).unwrap_err(),
        RelayError::WrongRecipient {
            to: f.b.node_id().clone(),
            me: f.c.node_id().clone()
        }
    );
    // The coordinator re-addresses it to C: the signature covers `to`.
    let mut readdressed = frame.clone();
    readdressed.parts_mut().0.to = f.c.node_id().clone();
    assert_eq!(
        open(&f.c, &f.verified, &readdressed).unwrap_err(),
        RelayError::BadSignature {
            from: f.a.node_id().clone()
        }
    );
}

#[test]
fn a_frame_sealed_to_a_substituted_key_does_not_decrypt() {
    // A coordinator that could substitute C's HPKE key (it cannot: keys come from the
    // signed registry) would get A to seal to a key C does not hold. HPKE refuses.
    let f = fed();
    let wrong_key = NodePublic {
        node_id: f.c.node_id().clone(),
        signing_key: f.c.public().signing_key,
        hpke_key: f.b.public().hpke_key,
    };
    let frame = seal(&f.a, &wrong_key, header(&f.a, &f.c, 1, 0, false), b"x").unwrap();
    assert_eq!(
        open(&f.c, &f.verified, &frame).unwrap_err(),
        RelayError::DecryptFailed {
            from: f.a.node_id().clone()
        }
    );
}

#[test]
fn tampering_with_any_part_of_a_frame_is_refused() {
    let f = fed();
    let frame = frame_a_to_b(&f, b"points");
    let refused = RelayError::BadSignature {
        from: f.a.node_id().clone(),
    };
    type Tamper = fn(&mut SealedFrame);
    let cases: [(&str, Tamper); 8] = [
        ("round", |fr| fr.parts_mut().0.round += 1),
        ("seq", |fr| fr.parts_mut().0.seq += 1),
        ("last", |fr| fr.parts_mut().0.last = true),
        ("session", |fr| fr.parts_mut().0.session_id[0] ^= 1),
        ("query digest", |fr| fr.parts_mut().0.query_digest[31] ^= 1),
        ("enc", |fr| fr.parts_mut().1[5] ^= 1),
        ("ciphertext", |fr| fr.parts_mut().2[3] ^= 1),
        ("signature", |fr| fr.parts_mut().3[10] ^= 1),
    ];
    for (what, tamper) in cases {
        let mut t = frame.clone();
        tamper(&mut t);
        assert_eq!(
            open(&f.b, &f.verified, &t).unwrap_err(),
            refused,
            "tampered {what}"
        );
    }
    // The protocol label is in the header too.
    let mut t = frame.clone();
    t.parts_mut().0.protocol = Protocol::SecAgg;
    assert_eq!(open(&f.b, &f.verified, &t).unwrap_err(), refused);
    // A truncated ciphertext.
    let mut t = frame;
    t.parts_mut().2.pop();
    assert_eq!(open(&f.b, &f.verified, &t).unwrap_err(), refused);
}

#[test]
fn a_node_cannot_pass_off_another_nodes_ciphertext_as_its_own() {
    // C (registered, malicious) takes A's sealed body to B and sends it under its own
    // header and signature. The signature is C's and valid, but the body was sealed with
    // A's header as associated data: HPKE refuses it. Without the AAD binding, C could
    // replay A's points to B as if they were C's.
    let f = fed();
    let original = frame_a_to_b(&f, b"A's points");
    let stolen = seal(
        &f.c,
        f.b.public(),
        header(&f.c, &f.b, 1, 0, false),
        b"decoy",
    )
    .unwrap();
    let mut spliced = stolen.clone();
    *spliced.parts_mut().1 = *original.enc();
    *spliced.parts_mut().2 = original.ciphertext().to_vec();
    // C re-signs, as it can for frames from itself.
    let resigned = resign(&f.c, spliced);
    assert_eq!(
        open(&f.b, &f.verified, &resigned).unwrap_err(),
        RelayError::DecryptFailed {
            from: f.c.node_id().clone()
        }
    );
}

/// Re-sign a frame with `signer`'s key: what a registered node can do to frames it claims
/// as its own.
fn resign(signer: &NodeIdentity, frame: SealedFrame) -> SealedFrame {
    use ed25519_dalek::Signer as _;
    let mut c = crate::canon::Canon::new("phm-relay/v1 frame");
    c.bytes(&frame.header().aad())
        .fixed(frame.enc())
        .bytes(frame.ciphertext());
    let sig = signer.signing_key().sign(&c.finish()).to_bytes();
    let mut frame = frame;
    *frame.parts_mut().3 = sig;
    frame
}

#[test]
fn a_frame_from_a_node_outside_the_registry_is_refused() {
    let f = fed();
    let frame = seal(
        &f.outsider,
        f.b.public(),
        header(&f.outsider, &f.b, 1, 0, false),
        b"hi",
    )
    .unwrap();
    assert_eq!(
        open(&f.b, &f.verified, &frame).unwrap_err(),
        RelayError::UnknownSender(f.outsider.node_id().clone())
    );
}

#[test]
fn a_frame_signed_by_another_key_than_the_registered_one_is_refused() {
    // An impostor (the coordinator, or anyone) with a fresh key claiming to be RW2.
    let f = fed();
    let impostor = NodeIdentity::generate(id("RW2")).unwrap();
    let frame = seal(
        &impostor,
        f.b.public(),
        header(&impostor, &f.b, 1, 0, false),
        b"hi",
    )
    .unwrap();
    assert_eq!(
        open(&f.b, &f.verified, &frame).unwrap_err(),
        RelayError::BadSignature {
            from: f.a.node_id().clone()
        }
    );
}

#[test]
fn a_frame_for_another_federation_is_refused() {
    let f = fed();
    let mut h = header(&f.a, &f.b, 1, 0, false);
    h.federation_id = "another-ics".into();
    let frame = seal(&f.a, f.b.public(), h, b"hi").unwrap();
    assert!(matches!(
        open(&f.b, &f.verified, &frame).unwrap_err(),
        RelayError::WrongFederation { .. }
    ));
}

#[test]
fn frames_over_the_size_cap_are_refused_before_any_cryptography() {
    let f = fed();
    let h = header(&f.a, &f.b, 1, 0, false);
    let max = max_plaintext_len(&h);
    let at_cap = seal(&f.a, f.b.public(), h.clone(), &vec![0; max]).unwrap();
    assert_eq!(at_cap.encoded_len(), MAX_FRAME_BYTES);
    assert!(matches!(
        seal(&f.a, f.b.public(), h.clone(), &vec![0; max + 1]),
        Err(RelayError::FrameTooLarge { .. })
    ));
    // A frame grown after sealing: refused as too large, not as a bad signature, so no
    // signature or decryption work was done on it.
    let mut big = at_cap.clone();
    big.parts_mut().2.push(0);
    assert!(matches!(
        open(&f.b, &f.verified, &big),
        Err(RelayError::FrameTooLarge { .. })
    ));
    assert!(matches!(
        SealedFrame::from_parts(
            h.clone(),
            at_cap.enc(),
            vec![0; MAX_FRAME_BYTES],
            at_cap.signature()
        ),
        Err(RelayError::FrameTooLarge { .. })
    ));
    // A huge header field counts too.
    let mut h2 = h;
    h2.federation_id = "x".repeat(MAX_FRAME_BYTES);
    assert!(matches!(
        SealedFrame::from_parts(h2, at_cap.enc(), vec![0; 16], at_cap.signature()),
        Err(RelayError::FrameTooLarge { .. })
    ));
}

#[test]
fn from_parts_checks_lengths_and_round_trips() {
    let f = fed();
    let frame = frame_a_to_b(&f, b"x");
    let back = SealedFrame::from_parts(
        frame.header().clone(),
        frame.enc(),
        frame.ciphertext().to_vec(),
        frame.signature(),
    )
    .unwrap();
    assert_eq!(back, frame);
    assert!(matches!(
        SealedFrame::from_parts(
            frame.header().clone(),
            &[0; 31],
            frame.ciphertext().to_vec(),
            frame.signature()
        ),
        Err(RelayError::MalformedFrame(_))
    ));
    assert!(matches!(
        SealedFrame::from_parts(
            frame.header().clone(),
            frame.enc(),
            frame.ciphertext().to_vec(),
            &[0; 63]
        ),
        Err(RelayError::MalformedFrame(_))
    ));
    assert!(matches!(
        SealedFrame::from_parts(
            frame.header().clone(),
            frame.enc(),
            vec![0; 15],
            frame.signature()
        ),
        Err(RelayError::MalformedFrame(_))
    ));
}

#[test]
fn seal_refuses_a_header_that_does_not_match_sender_or_recipient() {
    let f = fed();
    assert!(seal(&f.a, f.c.public(), header(&f.a, &f.b, 1, 0, false), b"").is_err());
    assert!(seal(&f.c, f.b.public(), header(&f.a, &f.b, 1, 0, false), b"").is_err());
    assert!(matches!(
        seal(&f.a, f.a.public(), header(&f.a, &f.a, 1, 0, false), b""),
        Err(RelayError::SelfAddressed(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Inbox and Outbox

fn inbox_b(f: &Fed, session: u8) -> Inbox {
    Inbox::new(
        ctx(session),
        &f.b,
        &[f.a.node_id().clone(), f.c.node_id().clone()],
    )
    .unwrap()
}

fn outbox(from: &NodeIdentity, to: &NodeIdentity, session: u8) -> Outbox {
    Outbox::new(ctx(session), from, &[to.node_id().clone()]).unwrap()
}

#[test]
fn an_inbox_accepts_a_whole_session_in_order() {
    let f = fed();
    let mut out_a = outbox(&f.a, &f.b, 9);
    let mut out_c = outbox(&f.c, &f.b, 9);
    let mut inbox = inbox_b(&f, 9);
    let frames = [
        out_a
            .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"a1.0")
            .unwrap(),
        out_c
            .seal(&f.c, &f.verified, f.b.node_id(), 1, true, b"c1.0")
            .unwrap(),
        out_a
            .seal(&f.a, &f.verified, f.b.node_id(), 1, true, b"a1.1")
            .unwrap(),
        out_a
            .seal(&f.a, &f.verified, f.b.node_id(), 2, true, b"a2.0")
            .unwrap(),
        out_c
            .seal(&f.c, &f.verified, f.b.node_id(), 2, true, b"")
            .unwrap(),
    ];
    let mut got = Vec::new();
    for fr in &frames {
        let d = inbox.accept(&f.b, &f.verified, fr).unwrap();
        got.push((
            d.header.from.to_string(),
            d.header.round,
            d.header.seq,
            d.plaintext.to_vec(),
            d.round_complete,
        ));
        if d.header.round == 1 && d.header.from == *f.c.node_id() {
            assert!(inbox.is_round_complete(f.c.node_id(), 1));
            assert!(!inbox.is_round_complete_for_all(1));
        }
    }
    assert_eq!(got[2], ("RW2".into(), 1, 1, b"a1.1".to_vec(), true));
    assert!(inbox.is_round_complete_for_all(1));
    assert!(inbox.is_complete());
    assert!(inbox.aborted().is_none());
}

#[test]
fn a_replayed_frame_is_refused() {
    let f = fed();
    let mut out = outbox(&f.a, &f.b, 9);
    let mut inbox = inbox_b(&f, 9);
    let f0 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"0")
        .unwrap();
    inbox.accept(&f.b, &f.verified, &f0).unwrap();
    assert_eq!(
        inbox.accept(&f.b, &f.verified, &f0).unwrap_err(),
        RelayError::Replayed {
            from: f.a.node_id().clone(),
            round: 1,
            seq: 0
        }
    );
}

#[test]
fn a_replay_from_an_earlier_round_is_refused() {
    let f = fed();
    let mut out = outbox(&f.a, &f.b, 9);
    let mut inbox = inbox_b(&f, 9);
    let r1 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, true, b"r1")
        .unwrap();
    inbox.accept(&f.b, &f.verified, &r1).unwrap();
    let r2 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 2, false, b"r2")
        .unwrap();
    inbox.accept(&f.b, &f.verified, &r2).unwrap();
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &r1).unwrap_err(),
        RelayError::Replayed {
            round: 1,
            seq: 0,
            ..
        }
    ));
}

#[test]
fn an_out_of_order_frame_is_refused() {
    let f = fed();
    let mut out = outbox(&f.a, &f.b, 9);
    let mut inbox = inbox_b(&f, 9);
    let _f0 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"0")
        .unwrap();
    let f1 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"1")
        .unwrap();
    // The coordinator drops (or holds back) seq 0.
    assert_eq!(
        inbox.accept(&f.b, &f.verified, &f1).unwrap_err(),
        RelayError::OutOfOrder {
            from: f.a.node_id().clone(),
            round: 1,
            seq: 1,
            expected_round: 1,
            expected_seq: 0
        }
    );
}

#[test]
fn a_later_round_before_the_current_one_ended_is_refused() {
    // The coordinator withholds the tail of round 1 and delivers round 2.
    let f = fed();
    let mut inbox = inbox_b(&f, 9);
    let f0 = seal(&f.a, f.b.public(), header(&f.a, &f.b, 1, 0, false), b"0").unwrap();
    inbox.accept(&f.b, &f.verified, &f0).unwrap();
    let r2 = seal(&f.a, f.b.public(), header(&f.a, &f.b, 2, 0, true), b"2").unwrap();
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &r2).unwrap_err(),
        RelayError::OutOfOrder {
            round: 2,
            expected_round: 1,
            expected_seq: 1,
            ..
        }
    ));
}

#[test]
fn a_frame_after_last_is_refused() {
    let f = fed();
    let mut inbox = inbox_b(&f, 9);
    let r1 = seal(&f.a, f.b.public(), header(&f.a, &f.b, 1, 0, true), b"only").unwrap();
    inbox.accept(&f.b, &f.verified, &r1).unwrap();
    // A frame after round 1's last, signed by A itself (a confused or malicious sender).
    let extra = seal(&f.a, f.b.public(), header(&f.a, &f.b, 1, 1, false), b"more").unwrap();
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &extra).unwrap_err(),
        RelayError::AfterLast {
            round: 1,
            seq: 1,
            ..
        }
    ));

    // After the last round's last frame, nothing at all.
    let mut inbox = inbox_b(&f, 9);
    for (round, seq) in [(1, 0), (2, 0)] {
        let fr = seal(
            &f.a,
            f.b.public(),
            header(&f.a, &f.b, round, seq, true),
            b"",
        )
        .unwrap();
        inbox.accept(&f.b, &f.verified, &fr).unwrap();
    }
    let extra = seal(&f.a, f.b.public(), header(&f.a, &f.b, 2, 1, true), b"").unwrap();
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &extra).unwrap_err(),
        RelayError::AfterLast {
            round: 2,
            seq: 1,
            ..
        }
    ));
    let beyond = seal(&f.a, f.b.public(), header(&f.a, &f.b, 3, 0, true), b"").unwrap();
    let mut fresh = inbox_b(&f, 9);
    assert!(matches!(
        fresh.accept(&f.b, &f.verified, &beyond).unwrap_err(),
        RelayError::RoundOutOfRange { round: 3, .. }
    ));
}

#[test]
fn frames_spliced_from_another_session_query_protocol_or_recipient_are_refused() {
    let f = fed();
    // A's frame from session 8 (otherwise identical), delivered into session 9.
    let mut other_session = outbox(&f.a, &f.b, 8);
    let spliced = other_session
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"old")
        .unwrap();
    assert_eq!(
        inbox_b(&f, 9)
            .accept(&f.b, &f.verified, &spliced)
            .unwrap_err(),
        RelayError::WrongSession {
            from: f.a.node_id().clone()
        }
    );

    let mut other_query = ctx(9);
    other_query.query_digest = [2; 32];
    let mut out = Outbox::new(other_query, &f.a, &[f.b.node_id().clone()]).unwrap();
    let fr = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"q")
        .unwrap();
    assert!(matches!(
        inbox_b(&f, 9).accept(&f.b, &f.verified, &fr).unwrap_err(),
        RelayError::WrongQuery { .. }
    ));

    let mut other_protocol = ctx(9);
    other_protocol.protocol = Protocol::SecAgg;
    let mut out = Outbox::new(other_protocol, &f.a, &[f.b.node_id().clone()]).unwrap();
    let fr = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"p")
        .unwrap();
    assert_eq!(
        inbox_b(&f, 9).accept(&f.b, &f.verified, &fr).unwrap_err(),
        RelayError::WrongProtocol {
            expected: Protocol::Link,
            got: Protocol::SecAgg
        }
    );

    // A's frame to C, delivered to B.
    let mut out = outbox(&f.a, &f.c, 9);
    let fr = out
        .seal(&f.a, &f.verified, f.c.node_id(), 1, false, b"for C")
        .unwrap();
    assert!(matches!(
        inbox_b(&f, 9).accept(&f.b, &f.verified, &fr).unwrap_err(),
        RelayError::WrongRecipient { .. }
    ));
}

#[test]
fn a_registered_node_outside_the_session_is_refused() {
    let f = fed();
    let mut inbox = Inbox::new(ctx(9), &f.b, &[f.a.node_id().clone()]).unwrap();
    let fr = seal(&f.c, f.b.public(), header(&f.c, &f.b, 1, 0, false), b"").unwrap();
    assert_eq!(
        inbox.accept(&f.b, &f.verified, &fr).unwrap_err(),
        RelayError::NotAPeer(f.c.node_id().clone())
    );
}

#[test]
fn after_one_refusal_the_inbox_refuses_everything() {
    let f = fed();
    let mut out = outbox(&f.a, &f.b, 9);
    let mut inbox = inbox_b(&f, 9);
    let good = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"0")
        .unwrap();
    let mut forged = good.clone();
    forged.parts_mut().2[0] ^= 1;
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &forged),
        Err(RelayError::BadSignature { .. })
    ));
    assert!(matches!(
        inbox.accept(&f.b, &f.verified, &good),
        Err(RelayError::SessionAborted(_))
    ));
    assert!(inbox.aborted().unwrap().contains("signature"));
}

#[test]
fn the_outbox_numbers_frames_and_refuses_to_send_out_of_order() {
    let f = fed();
    let mut out = outbox(&f.a, &f.b, 9);
    let f0 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, false, b"")
        .unwrap();
    let f1 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 1, true, b"")
        .unwrap();
    assert_eq!((f0.header().round, f0.header().seq), (1, 0));
    assert_eq!(
        (f1.header().round, f1.header().seq, f1.header().last),
        (1, 1, true)
    );
    assert!(matches!(
        out.seal(&f.a, &f.verified, f.b.node_id(), 1, false, b""),
        Err(RelayError::SendOutOfOrder { .. })
    ));
    let mut fresh = outbox(&f.a, &f.b, 9);
    assert!(matches!(
        fresh.seal(&f.a, &f.verified, f.b.node_id(), 2, false, b""),
        Err(RelayError::SendOutOfOrder { .. })
    ));
    assert!(matches!(
        fresh.seal(&f.a, &f.verified, f.c.node_id(), 1, false, b""),
        Err(RelayError::NotAPeer(_))
    ));
    let f2 = out
        .seal(&f.a, &f.verified, f.b.node_id(), 2, true, b"")
        .unwrap();
    assert_eq!((f2.header().round, f2.header().seq), (2, 0));
    assert!(
        out.seal(&f.a, &f.verified, f.b.node_id(), 2, true, b"")
            .is_err()
    );
}

#[test]
fn sessions_refuse_inconsistent_set_up() {
    let f = fed();
    let mut backwards = ctx(9);
    backwards.first_round = 3;
    assert!(Inbox::new(backwards, &f.b, &[f.a.node_id().clone()]).is_err());
    assert!(Inbox::new(ctx(9), &f.b, &[f.b.node_id().clone()]).is_err());
    assert!(matches!(
        Inbox::new(
            ctx(9),
            &f.b,
            &[f.a.node_id().clone(), f.a.node_id().clone()]
        ),
        Err(RelayError::DuplicateCohortMember(_))
    ));
}

// ---------------------------------------------------------------------------------------
// Statements

#[test]
fn statements_are_bound_to_protocol_session_and_kind() {
    let f = fed();
    let sig =
        f.a.sign_statement(Protocol::SecAgg, &[3; 32], "keys", b"c_pk s_pk");
    let a = f.a.public();
    assert!(
        a.verify_statement(Protocol::SecAgg, &[3; 32], "keys", b"c_pk s_pk", &sig)
            .is_ok()
    );
    assert!(
        a.verify_statement(Protocol::SecAgg, &[4; 32], "keys", b"c_pk s_pk", &sig)
            .is_err()
    );
    assert!(
        a.verify_statement(Protocol::Link, &[3; 32], "keys", b"c_pk s_pk", &sig)
            .is_err()
    );
    assert!(
        a.verify_statement(Protocol::SecAgg, &[3; 32], "U3", b"c_pk s_pk", &sig)
            .is_err()
    );
    assert!(
        a.verify_statement(Protocol::SecAgg, &[3; 32], "keys", b"c_pk s_pK", &sig)
            .is_err()
    );
    assert!(
        f.b.public()
            .verify_statement(Protocol::SecAgg, &[3; 32], "keys", b"c_pk s_pk", &sig)
            .is_err()
    );
    assert!(
        a.verify_statement(Protocol::SecAgg, &[3; 32], "keys", b"c_pk s_pk", &sig[..63])
            .is_err()
    );
}

/// A batch passes only if every statement does, and names the first that does not.
#[test]
fn a_batch_of_statements_names_the_first_bad_signature() {
    let f = fed();
    let (a, b) = (f.a.public(), f.b.public());
    let sa =
        f.a.sign_statement(Protocol::SecAgg, &[3; 32], "keys", b"a's keys");
    let sb =
        f.b.sign_statement(Protocol::SecAgg, &[3; 32], "keys", b"b's keys");
    let check = |signer, body: &'static [u8], signature: &[u8]| (signer, body, signature.to_vec());
    let run = |items: &[(&crate::NodePublic, &[u8], Vec<u8>)]| {
        let checks: Vec<crate::StatementCheck<'_>> = items
            .iter()
            .map(|(signer, body, signature)| crate::StatementCheck {
                signer,
                body,
                signature,
            })
            .collect();
        crate::verify_statements(Protocol::SecAgg, &[3; 32], "keys", &checks)
    };
    assert_eq!(run(&[]), Ok(()));
    assert_eq!(
        run(&[check(a, b"a's keys", &sa), check(b, b"b's keys", &sb)]),
        Ok(())
    );
    // b's signature over another body; a's signature presented as b's; a short one.
    assert_eq!(
        run(&[check(a, b"a's keys", &sa), check(b, b"a's keys", &sb)]),
        Err(1)
    );
    assert_eq!(
        run(&[check(b, b"a's keys", &sa), check(b, b"b's keys", &sb)]),
        Err(0)
    );
    assert_eq!(
        run(&[check(a, b"a's keys", &sa), check(b, b"b's keys", &sb[..63])]),
        Err(1)
    );
}

// ---------------------------------------------------------------------------------------
// The registry

#[test]
fn the_registry_verifies_under_the_pinned_key_only() {
    let f = fed();
    assert_eq!(f.verified.federation_id(), FED);
    assert_eq!(f.verified.nodes().count(), 3);
    assert!(f.verified.check_identity(&f.a).is_ok());
    assert_eq!(
        f.verified.check_identity(&f.outsider).unwrap_err(),
        RelayError::NotInRegistry(f.outsider.node_id().clone())
    );
    let impostor = NodeIdentity::generate(id("RW2")).unwrap();
    assert_eq!(
        f.verified.check_identity(&impostor).unwrap_err(),
        RelayError::IdentityMismatch(id("RW2"))
    );

    // Signed by a key that is not the pinned one (the coordinator's, say).
    let foreign = SigningKey::from_bytes(&[8; 32]);
    let mut forged = f.registry.clone();
    forged.sign(&foreign).unwrap();
    assert_eq!(
        forged
            .verify(&f.registry_key.verifying_key(), NOW)
            .unwrap_err(),
        RelayError::RegistrySignature
    );

    // Unsigned.
    let unsigned = Registry::new(FED, 1, NOW + DAY, f.registry.nodes.clone());
    assert_eq!(
        unsigned
            .verify(&f.registry_key.verifying_key(), NOW)
            .unwrap_err(),
        RelayError::RegistryUnsigned
    );

    // Altered after signing: an extra node, a swapped key, a longer life.
    let mut added = f.registry.clone();
    added.nodes.push(entry(&f.outsider));
    let mut swapped = f.registry.clone();
    swapped.nodes[0].node.hpke_key = f.outsider.public().hpke_key;
    let mut extended = f.registry.clone();
    extended.valid_until_ms += DAY;
    for altered in [added, swapped, extended] {
        assert_eq!(
            altered
                .verify(&f.registry_key.verifying_key(), NOW)
                .unwrap_err(),
            RelayError::RegistrySignature
        );
    }
}

#[test]
fn an_expired_registry_is_refused_and_expired_nodes_are_left_out() {
    let f = fed();
    assert_eq!(
        f.registry
            .verify(&f.registry_key.verifying_key(), NOW + 30 * DAY)
            .unwrap_err(),
        RelayError::RegistryExpired {
            valid_until_ms: NOW + 30 * DAY,
            now_ms: NOW + 30 * DAY
        }
    );
    // A node whose window has ended (or not begun) is not a valid sender.
    let mut reg = f.registry.clone();
    reg.nodes[0].valid_until_ms = NOW;
    reg.nodes[1].valid_from_ms = NOW + 1;
    reg.sign(&f.registry_key).unwrap();
    let verified = reg.verify(&f.registry_key.verifying_key(), NOW).unwrap();
    assert!(verified.get(f.a.node_id()).is_none());
    assert!(verified.get(f.b.node_id()).is_none());
    assert!(verified.get(f.c.node_id()).is_some());
    let frame = seal(&f.a, f.c.public(), header(&f.a, &f.c, 1, 0, false), b"").unwrap();
    assert_eq!(
        open(&f.c, &verified, &frame).unwrap_err(),
        RelayError::UnknownSender(f.a.node_id().clone())
    );
}

#[test]
fn duplicated_nodes_and_keys_are_refused_when_signing_and_verifying() {
    let f = fed();
    let pinned = f.registry_key.verifying_key();
    let twin = NodeIdentity::generate(id("RW2")).unwrap();

    let mut dup_node = f.registry.clone();
    dup_node.nodes.push(entry(&twin));
    assert_eq!(
        dup_node.sign(&f.registry_key).unwrap_err(),
        RelayError::DuplicateNode(id("RW2"))
    );
    dup_node.sign_unchecked(&f.registry_key);
    assert_eq!(
        dup_node.verify(&pinned, NOW).unwrap_err(),
        RelayError::DuplicateNode(id("RW2"))
    );

    // Two nodes sharing a signing key (one could speak for the other).
    let mut dup_key = f.registry.clone();
    dup_key.nodes[1].node.signing_key = dup_key.nodes[0].node.signing_key;
    dup_key.sign_unchecked(&f.registry_key);
    assert!(matches!(
        dup_key.verify(&pinned, NOW).unwrap_err(),
        RelayError::DuplicateKey {
            which: "signing",
            ..
        }
    ));
    let mut dup_hpke = f.registry.clone();
    dup_hpke.nodes[2].node.hpke_key = dup_hpke.nodes[0].node.hpke_key;
    dup_hpke.sign_unchecked(&f.registry_key);
    assert!(matches!(
        dup_hpke.verify(&pinned, NOW).unwrap_err(),
        RelayError::DuplicateKey { which: "HPKE", .. }
    ));

    // The IG leads' key listed as a node's.
    let mut reg_key_node = f.registry.clone();
    reg_key_node.nodes[0].node.signing_key = pinned;
    assert_eq!(
        reg_key_node.sign(&f.registry_key).unwrap_err(),
        RelayError::RegistryKeyIsNodeKey(id("RW2"))
    );

    let mut empty_window = f.registry.clone();
    empty_window.nodes[0].valid_until_ms = empty_window.nodes[0].valid_from_ms;
    assert!(matches!(
        empty_window.sign(&f.registry_key).unwrap_err(),
        RelayError::EmptyValidity { .. }
    ));
}

#[test]
fn the_registry_signature_does_not_depend_on_entry_order() {
    let f = fed();
    let mut reordered = f.registry.clone();
    reordered.nodes.reverse();
    assert_eq!(reordered.signing_bytes(), f.registry.signing_bytes());
    assert!(
        reordered
            .verify(&f.registry_key.verifying_key(), NOW)
            .is_ok()
    );
    assert!(
        f.registry
            .signing_bytes()
            .starts_with(&[0, 0, 0, 0, 0, 0, 0, 15])
    );
    assert!(f.registry.signing_bytes()[8..].starts_with(b"phm-registry/v1"));
}

#[test]
fn the_registry_file_round_trips_and_errors_name_the_line() {
    let f = fed();
    let text = f.registry.to_toml();
    let back = Registry::parse(&text).unwrap();
    assert_eq!(back, f.registry);
    assert!(back.verify(&f.registry_key.verifying_key(), NOW).is_ok());

    // Unsigned files parse (for `phm registry sign`) and are refused by verify.
    let unsigned: String = text
        .lines()
        .filter(|l| !l.starts_with("signature"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        Registry::parse(&unsigned)
            .unwrap()
            .verify(&f.registry_key.verifying_key(), NOW)
            .unwrap_err(),
        RelayError::RegistryUnsigned
    );

    let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let b_key = signing_key_to_base64(&f.b.public().signing_key);
    let cases = [
        (text.replace(&b_key, "AAAA"), line_of(&b_key), "Ed25519"),
        (
            text.replace("node_id = \"RY4\"", "node_id = \"R Y4\""),
            line_of("RY4"),
            "node id",
        ),
        (
            text.replace("valid_from_ms", "valid_since_ms"),
            line_of("valid_from_ms"),
            "unknown field",
        ),
        (
            text.replace("version = 1", "version = 2"),
            line_of("version"),
            "version 1 only",
        ),
    ];
    for (bad, line, says) in cases {
        match Registry::parse(&bad).unwrap_err() {
            RelayError::RegistryFile { line: got, message } => {
                assert_eq!(got, Some(line), "{message}");
                assert!(message.contains(says), "{message:?} should say {says:?}");
            }
            other => panic!("{other:?}"),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Session ids

#[test]
fn session_ids_ignore_cohort_order_and_bind_everything_else() {
    let f = fed();
    let nonce = [5u8; 32];
    let abc = [f.a.public(), f.b.public(), f.c.public()];
    let cba = [f.c.public(), f.b.public(), f.a.public()];
    let base = session_id(Protocol::SecAgg, &[1; 32], &nonce, abc, b"N=3").unwrap();
    assert_eq!(
        base,
        session_id(Protocol::SecAgg, &[1; 32], &nonce, cba, b"N=3").unwrap()
    );

    let differs = [
        session_id(Protocol::SecAgg, &[1; 32], &[6u8; 32], abc, b"N=3").unwrap(),
        session_id(Protocol::SecAgg, &[1; 32], &nonce, abc, b"N=4").unwrap(),
        session_id(Protocol::SecAgg, &[2; 32], &nonce, abc, b"N=3").unwrap(),
        session_id(Protocol::Link, &[1; 32], &nonce, abc, b"N=3").unwrap(),
        session_id(
            Protocol::SecAgg,
            &[1; 32],
            &nonce,
            [f.a.public(), f.b.public()],
            b"N=3",
        )
        .unwrap(),
    ];
    for (i, d) in differs.iter().enumerate() {
        assert_ne!(*d, base, "case {i}");
    }
    // The same node id with another key is another cohort.
    let impostor = NodeIdentity::generate(id("RW2")).unwrap();
    let swapped = [impostor.public(), f.b.public(), f.c.public()];
    assert_ne!(
        session_id(Protocol::SecAgg, &[1; 32], &nonce, swapped, b"N=3").unwrap(),
        base
    );

    assert_eq!(
        session_id(
            Protocol::SecAgg,
            &[1; 32],
            &nonce,
            [f.a.public(), f.a.public()],
            b""
        )
        .unwrap_err(),
        RelayError::DuplicateCohortMember(id("RW2"))
    );
    assert!(session_id(Protocol::SecAgg, &[1; 32], &nonce, [], b"").is_err());
    assert!(matches!(
        session_id(Protocol::SecAgg, &[1; 32], &[0; 8], abc, b""),
        Err(RelayError::BadNonce { len: 8, .. })
    ));
}

#[test]
fn a_cohort_is_looked_up_in_the_verified_registry() {
    let f = fed();
    let cohort = f.verified.cohort(&[id("RY4"), id("RW2")]).unwrap();
    assert_eq!(cohort[0].node_id, id("RY4"));
    assert_eq!(
        f.verified.cohort(&[id("RW2"), id("ZZ999")]).unwrap_err(),
        RelayError::NotInRegistry(id("ZZ999"))
    );
    assert!(f.verified.cohort(&[id("RW2"), id("RW2")]).is_err());
}

#[test]
fn query_digests_parse_from_hex() {
    let hex_digest = "ab".repeat(32);
    assert_eq!(parse_digest(&hex_digest).unwrap(), [0xab; 32]);
    assert!(parse_digest("abc").is_err());
}

// ---------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn session_id_is_the_same_for_every_order_of_the_cohort(
        perm in Just((0..5usize).collect::<Vec<_>>()).prop_shuffle(),
        nonce in proptest::collection::vec(any::<u8>(), 16..=64),
        params in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let nodes = cohort_of_five();
        let sorted: Vec<&NodePublic> = nodes.iter().collect();
        let shuffled: Vec<&NodePublic> = perm.iter().map(|&i| &nodes[i]).collect();
        prop_assert_eq!(
            session_id(Protocol::Link, &[0; 32], &nonce, sorted, &params).unwrap(),
            session_id(Protocol::Link, &[0; 32], &nonce, shuffled, &params).unwrap()
        );
    }

    #[test]
    fn flipping_any_bit_of_a_frame_is_refused(part in 0..3usize, index in any::<prop::sample::Index>(), bit in 0..8u8) {
        let (f, frame) = sample_frame();
        let mut t = frame.clone();
        let (_, enc, ct, sig) = t.parts_mut();
        let bytes: &mut [u8] = match part { 0 => &mut enc[..], 1 => &mut ct[..], _ => &mut sig[..] };
        let i = index.index(bytes.len());
        bytes[i] ^= 1 << bit;
        prop_assert!(open(&f.b, &f.verified, &t).is_err());
    }

    #[test]
    fn the_identity_parser_never_panics(text in "(version = 1\n)?([a-z_]{0,16} ?= ?\"?[A-Za-z0-9+/=]{0,50}\"?\n){0,6}") {
        let _ = NodeIdentity::from_file_text(&text);
    }

    #[test]
    fn the_registry_parser_never_panics(text in "\\PC{0,400}") {
        let _ = Registry::parse(&text);
    }
}

fn cohort_of_five() -> Vec<NodePublic> {
    ["A", "B", "C", "D", "E"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let byte = u8::try_from(i).unwrap();
            NodeIdentity::from_secrets(id(n), &[byte; 32], &[byte + 100; 32])
                .unwrap()
                .public()
                .clone()
        })
        .collect()
}

fn sample_frame() -> (Fed, SealedFrame) {
    let f = fed();
    let frame = frame_a_to_b(&f, b"sixty-four thousand points, or a few");
    (f, frame)
}

#[test]
fn sealing_to_a_low_order_hpke_key_fails_instead_of_leaking() {
    // The all-zero X25519 point makes every shared secret zero; RFC 9180 says abort.
    let f = fed();
    let broken = NodePublic {
        node_id: f.b.node_id().clone(),
        signing_key: f.b.public().signing_key,
        hpke_key: HpkePublicKey::from_bytes([0; 32]),
    };
    assert!(matches!(
        seal(&f.a, &broken, header(&f.a, &f.b, 1, 0, false), b"secret"),
        Err(RelayError::SealFailed { .. })
    ));
}
