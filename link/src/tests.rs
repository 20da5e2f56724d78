//! Tests across modules: noise-free counts against a plaintext join, the whole protocol
//! A ↔ relay ↔ B over real sealed frames with a recording (and misbehaving) relay, the
//! structure of what the anchor learns, and malformed messages. Each test names the
//! property it guards and fails if that property breaks.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};

use curve25519_dalek::ristretto::CompressedRistretto;
use phm_relay::{
    NodeId, NodeIdentity, Registry, RegistryEntry, SealedFrame, SigningKey, VerifiedRegistry,
};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha20Rng;

use crate::dp::test_noise::{SeededLaplace, ZeroNoise};
use crate::wire::Assembler;
use crate::*;

const NOW: u64 = 1_764_633_600_000;
const DAY: u64 = 86_400_000;

struct Fed {
    a: NodeIdentity,
    b: NodeIdentity,
    c: NodeIdentity,
    verified: VerifiedRegistry,
}

fn fed() -> Fed {
    let registry_key = SigningKey::from_bytes(&[7; 32]);
    let a = NodeIdentity::generate(NodeId::new("A81001").unwrap()).unwrap();
    let b = NodeIdentity::generate(NodeId::new("RW2").unwrap()).unwrap();
    let c = NodeIdentity::generate(NodeId::new("RY4").unwrap()).unwrap();
    let entries = [&a, &b, &c]
        .iter()
        .map(|n| RegistryEntry {
            node: n.public().clone(),
            valid_from_ms: NOW - DAY,
            valid_until_ms: NOW + DAY,
        })
        .collect();
    let mut registry = Registry::new("synthetic-ics", 1, NOW + DAY, entries);
    registry.sign(&registry_key).unwrap();
    let verified = registry.verify(&registry_key.verifying_key(), NOW).unwrap();
    Fed { a, b, c, verified }
}

/// Small μ keeps the debug-build tests fast; the protocol is the same at any μ.
fn small_params(groups: usize, negated: bool) -> LinkParams {
    LinkParams {
        groups,
        link: ClampedLaplace::new(1.5, 4).unwrap(),
        size: ClampedLaplace::new(3.0, 3).unwrap(),
        negated,
        max_set_size: 10_000,
    }
}

/// A synthetic case: anchor records (raw number, group), partner records.
struct Case {
    groups: usize,
    anchor: Vec<(Option<String>, usize)>,
    partner: Vec<Option<String>>,
}

fn number(rng: &mut ChaCha20Rng) -> String {
    loop {
        if let Some(n) = with_check_digit(rng.gen_range(999_000_000..=999_999_999)) {
            return String::from_utf8(n.digits().to_vec()).unwrap();
        }
    }
}

/// A number with a wrong check digit, or a malformed or missing value.
fn unlinkable(rng: &mut ChaCha20Rng) -> Option<String> {
    match rng.gen_range(0..4) {
        0 => None,
        1 => Some(String::new()),
        2 => Some("12345".into()),
        _ => {
            let mut n = number(rng).into_bytes();
            n[9] = b'0' + (n[9] - b'0' + 1) % 10;
            Some(String::from_utf8(n).unwrap())
        }
    }
}

fn spaced(n: &str) -> String {
    format!("{} {} {}", &n[..3], &n[3..6], &n[6..])
}

fn gen_case(rng: &mut ChaCha20Rng) -> Case {
    let groups = rng.gen_range(1..=4);
    let n_a = rng.gen_range(0..=30);
    let n_b = rng.gen_range(0..=30);
    let overlap: f64 = rng.r#gen();
    let a_people: Vec<(String, usize)> = (0..n_a)
        .map(|_| (number(rng), rng.gen_range(0..groups)))
        .collect();
    let mut partner: Vec<Option<String>> = Vec::new();
    for (n, _) in &a_people {
        if rng.gen_bool(overlap) {
            partner.push(Some(n.clone()));
        }
    }
    partner.extend((0..n_b).map(|_| Some(number(rng))));
    let mut anchor: Vec<(Option<String>, usize)> = a_people
        .iter()
        .map(|(n, g)| (Some(n.clone()), *g))
        .collect();
    // Duplicates on either side (the same person twice, the same label), written with
    // and without spaces; unlinkable records on either side.
    for _ in 0..rng.gen_range(0..5) {
        if let Some((n, g)) = a_people.get(rng.gen_range(0..a_people.len().max(1))) {
            anchor.push((Some(spaced(n)), *g));
        }
        if let Some(Some(n)) = partner.get(rng.gen_range(0..partner.len().max(1))).cloned() {
            partner.push(Some(spaced(&n)));
        }
    }
    for _ in 0..rng.gen_range(0..5) {
        anchor.push((unlinkable(rng), rng.gen_range(0..groups)));
        partner.push(unlinkable(rng));
    }
    Case {
        groups,
        anchor,
        partner,
    }
}

/// The plaintext join: per group, distinct valid anchor numbers present at the partner
/// (or absent, for NOT EXISTS) with at least `k` partner records.
fn reference(case: &Case, negated: bool, k: u32) -> Vec<i64> {
    let valid = |s: &Option<String>| NhsNumber::parse_opt(s.as_deref()).ok();
    let mut rows: BTreeMap<NhsNumber, u32> = BTreeMap::new();
    for n in case.partner.iter().filter_map(valid) {
        *rows.entry(n).or_insert(0) += 1;
    }
    let partner: BTreeSet<NhsNumber> = rows
        .into_iter()
        .filter(|(_, c)| *c >= k.max(1))
        .map(|(n, _)| n)
        .collect();
    let mut people: BTreeMap<NhsNumber, usize> = BTreeMap::new();
    for (n, g) in &case.anchor {
        if let Some(n) = valid(n) {
            people.insert(n, *g);
        }
    }
    let mut out = vec![0i64; case.groups];
    for (n, g) in people {
        if partner.contains(&n) != negated {
            out[g] += 1;
        }
    }
    out
}

fn cohorts(case: &Case) -> (AnchorCohort, PartnerCohort) {
    cohorts_having(case, 1)
}

fn cohorts_having(case: &Case, k: u32) -> (AnchorCohort, PartnerCohort) {
    let a = AnchorCohort::new(
        case.groups,
        case.anchor.iter().map(|(n, g)| (n.as_deref(), *g)),
    )
    .unwrap();
    let b = PartnerCohort::with_min_rows(case.partner.iter().map(|n| n.as_deref()), k);
    (a, b)
}

/// The protocol without the relay: the three messages handed over directly.
fn run_direct(
    params: &LinkParams,
    a: &AnchorCohort,
    b: &PartnerCohort,
    noise_a: &mut dyn LinkNoise,
    noise_b: &mut dyn LinkNoise,
    rng: &mut ChaCha20Rng,
) -> (LinkedCounts, RoundF, RoundL, RoundR) {
    let (anchor, l) = Anchor::start(params, a, noise_a, rng).unwrap();
    let (partner, f) = Partner::start(params, b, noise_b, rng).unwrap();
    let anchor = anchor.receive_f(f.clone()).unwrap();
    let r = partner.receive_l(l.clone(), rng).unwrap();
    let counts = anchor.receive_r(r.clone()).unwrap();
    (counts, f, l, r)
}

#[test]
fn noise_free_counts_equal_a_plaintext_join_over_hundreds_of_cases() {
    let mut rng = ChaCha20Rng::seed_from_u64(14);
    let mut having_hits = 0;
    for i in 0..400 {
        let mut case = gen_case(&mut rng);
        let negated = i % 3 == 0;
        // HAVING COUNT(*) >= k: k of 1 (plain EXISTS), 2 or 3, with some partner people
        // given extra records so every k has people either side of it.
        let k = [1u32, 1, 2, 3][i % 4];
        let extra: Vec<Option<String>> = case
            .partner
            .iter()
            .filter(|_| rng.gen_bool(0.3))
            .cloned()
            .collect();
        case.partner.extend(extra);
        let params = small_params(case.groups, negated);
        let (a, b) = cohorts_having(&case, k);
        let (counts, ..) = run_direct(&params, &a, &b, &mut ZeroNoise, &mut ZeroNoise, &mut rng);
        let expected = reference(&case, negated, k);
        if k > 1 && expected != reference(&case, negated, 1) {
            having_hits += 1;
        }
        assert_eq!(counts.released, expected, "case {i} (k = {k})");
    }
    // HAVING really changed the answer in a good share of the cases that used it.
    assert!(having_hits > 40, "{having_hits}");
}

#[test]
fn edge_cases_empty_sets_and_full_overlap() {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let people: Vec<String> = (0..20).map(|_| number(&mut rng)).collect();
    let cases = [
        // both empty
        Case {
            groups: 2,
            anchor: vec![],
            partner: vec![],
        },
        // partner empty
        Case {
            groups: 1,
            anchor: people.iter().map(|n| (Some(n.clone()), 0)).collect(),
            partner: vec![],
        },
        // anchor empty
        Case {
            groups: 3,
            anchor: vec![],
            partner: people.iter().cloned().map(Some).collect(),
        },
        // 100% overlap, several groups
        Case {
            groups: 3,
            anchor: people
                .iter()
                .enumerate()
                .map(|(i, n)| (Some(n.clone()), i % 3))
                .collect(),
            partner: people.iter().cloned().map(Some).collect(),
        },
        // only unlinkable records
        Case {
            groups: 1,
            anchor: vec![(None, 0), (Some("0000000000".into()), 0)],
            partner: vec![None],
        },
    ];
    for (i, case) in cases.iter().enumerate() {
        for negated in [false, true] {
            let (a, b) = cohorts(case);
            let params = small_params(case.groups, negated);
            let (counts, ..) =
                run_direct(&params, &a, &b, &mut ZeroNoise, &mut ZeroNoise, &mut rng);
            assert_eq!(
                counts.released,
                reference(case, negated, 1),
                "case {i} negated {negated}"
            );
        }
    }
}

#[test]
fn cohorts_count_unlinkable_records_and_refuse_non_person_level_labels() {
    let a = AnchorCohort::new(
        2,
        [
            (Some("9434765919"), 0),
            (Some("943 476 5919"), 0),
            (Some("9434765918"), 1),
            (None, 1),
            (Some("abc"), 0),
            (Some("1111111111"), 0),
        ],
    )
    .unwrap();
    let s = a.stats();
    assert_eq!(
        (
            s.records,
            s.people,
            s.duplicates,
            s.bad_check_digit,
            s.missing,
            s.malformed,
            s.placeholder
        ),
        (6, 1, 1, 1, 1, 1, 1)
    );
    assert_eq!(s.unlinkable(), 4);
    assert_eq!(a.group_sizes(), vec![1, 0]);
    assert_eq!(
        AnchorCohort::new(2, [(Some("9434765919"), 0), (Some("9434765919"), 1)]).unwrap_err(),
        LinkError::NotPersonLevel
    );
    assert!(matches!(
        AnchorCohort::new(2, [(Some("9434765919"), 2)]),
        Err(LinkError::GroupOutOfRange { .. })
    ));
    // Debug shows statistics, never numbers.
    let shown = format!("{a:?}");
    assert!(!shown.contains("943"), "{shown}");
}

#[test]
fn the_anchor_learns_per_group_exactly_c_plus_k_and_k_is_in_zero_to_two_mu() {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    for seed in 0..20 {
        let case = gen_case(&mut rng);
        let params = small_params(case.groups, false);
        let (a, b) = cohorts(&case);
        let mut noise_b = SeededLaplace::new(seed);
        let mut noise_a = SeededLaplace::new(1000 + seed);
        let (counts, f, l, r) = run_direct(&params, &a, &b, &mut noise_a, &mut noise_b, &mut rng);
        let truth = reference(&case, false, 1);
        let mu = i64::from(params.link.mu());
        let z_link = &noise_b
            .log
            .iter()
            .find(|(p, _)| *p == NoisePurpose::Link)
            .unwrap()
            .1;
        let z_size_b = &noise_b
            .log
            .iter()
            .find(|(p, _)| *p == NoisePurpose::Size)
            .unwrap()
            .1;
        let z_size_a = &noise_a.log[0].1;
        for g in 0..case.groups {
            let k = params.link.shift(z_link[g]) as i64;
            assert!((0..=2 * mu).contains(&k));
            // m_g = released + μ = c_g + K_g: the anchor sees the count only with the
            // partner's dummies added.
            assert_eq!(counts.released[g] + mu, truth[g] + k, "group {g}");
            // |L_g| = n_g + J_g and |R_g| = |L_g| + 2μ: R's size says nothing about K.
            let j = params.size.shift(z_size_a[g]) as usize;
            assert_eq!(l.group_sizes()[g], a.group_sizes()[g] as usize + j);
            assert_eq!(r.group_sizes()[g], l.group_sizes()[g] + 2 * mu as usize);
        }
        // |F| = n_B + ΣK + J_B.
        let sum_k: u64 = z_link.iter().map(|&z| params.link.shift(z)).sum();
        let expected_f = b.stats().people + sum_k + params.size.shift(z_size_b[0]);
        assert_eq!(f.len() as u64, expected_f);
    }
}

#[test]
fn scalars_are_fresh_no_point_repeats_across_two_sessions() {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let case = gen_case(&mut rng);
    let params = small_params(case.groups, false);
    let (a, b) = cohorts(&case);
    let (_, f1, l1, r1) = run_direct(&params, &a, &b, &mut ZeroNoise, &mut ZeroNoise, &mut rng);
    let (_, f2, l2, r2) = run_direct(&params, &a, &b, &mut ZeroNoise, &mut ZeroNoise, &mut rng);
    let all = |f: &RoundF, l: &RoundL, r: &RoundR| -> HashSet<[u8; 32]> {
        let mut s: HashSet<[u8; 32]> = f.points.iter().map(|p| p.compress().to_bytes()).collect();
        s.insert(l.key_share.compress().to_bytes());
        s.extend(l.groups.iter().flatten().map(|p| p.compress().to_bytes()));
        s.extend(r.groups.iter().flatten().map(|c| c.to_bytes()));
        s
    };
    assert!(all(&f1, &l1, &r1).is_disjoint(&all(&f2, &l2, &r2)));
}

// ---------------------------------------------------------------------------------------
// Over real sealed frames

/// Every frame the relay carried, as the coordinator sees it.
#[derive(Default)]
struct RecordingRelay {
    frames: Vec<SealedFrame>,
}

impl RecordingRelay {
    fn carry(&mut self, frames: Vec<SealedFrame>) -> Vec<SealedFrame> {
        self.frames.extend(frames.iter().cloned());
        frames
    }

    /// Every byte the coordinator handled.
    fn bytes(&self) -> Vec<Vec<u8>> {
        self.frames
            .iter()
            .map(|f| {
                let mut v = f.header().aad();
                v.extend_from_slice(f.enc());
                v.extend_from_slice(f.ciphertext());
                v.extend_from_slice(f.signature());
                v
            })
            .collect()
    }
}

struct Run {
    counts: LinkedCounts,
    relay: RecordingRelay,
    f: Option<RoundF>,
    l: RoundL,
    r: Option<RoundR>,
}

fn session(f: &Fed, params: &LinkParams, nonce: u8) -> LinkSession {
    LinkSession::new(
        &f.verified,
        [9; 32],
        &[nonce; 16],
        f.a.public(),
        f.b.public(),
        params,
    )
    .unwrap()
}

/// A ↔ relay ↔ B over sealed frames, with `per_chunk` points per frame.
fn run_relayed(
    fd: &Fed,
    case: &Case,
    params: &LinkParams,
    per_chunk: usize,
    rng: &mut ChaCha20Rng,
) -> Run {
    let s = session(fd, params, 1);
    let (ac, bc) = cohorts(case);
    let mut a_ch = s.channel(&fd.a, Role::Anchor).unwrap();
    let mut b_ch = s.channel(&fd.b, Role::Partner).unwrap();
    a_ch.set_chunk_size(per_chunk);
    b_ch.set_chunk_size(per_chunk);
    let mut relay = RecordingRelay::default();

    let (anchor, l) = Anchor::start(params, &ac, &mut ZeroNoise, rng).unwrap();
    let (partner, f) = Partner::start(params, &bc, &mut ZeroNoise, rng).unwrap();
    let l_frames = relay.carry(a_ch.send_l(&fd.a, &fd.verified, &l).unwrap());
    let f_frames = relay.carry(b_ch.send_f(&fd.b, &fd.verified, &f).unwrap());

    let mut got_l = None;
    for fr in &l_frames {
        got_l = b_ch.accept(&fd.b, &fd.verified, fr).unwrap();
    }
    let Some(Incoming::L(got_l)) = got_l else {
        panic!("no L")
    };
    assert!(got_l == l);
    let mut got_f = None;
    for fr in &f_frames {
        got_f = a_ch.accept(&fd.a, &fd.verified, fr).unwrap();
    }
    let Some(Incoming::F(got_f)) = got_f else {
        panic!("no F")
    };
    let anchor = anchor.receive_f(got_f).unwrap();
    let r = partner.receive_l(got_l, rng).unwrap();
    let r_frames = relay.carry(b_ch.send_r(&fd.b, &fd.verified, &r).unwrap());
    let mut got_r = None;
    for fr in &r_frames {
        got_r = a_ch.accept(&fd.a, &fd.verified, fr).unwrap();
    }
    let Some(Incoming::R(got_r)) = got_r else {
        panic!("no R")
    };
    assert!(a_ch.is_complete() && b_ch.is_complete());
    let counts = anchor.receive_r(got_r).unwrap();
    Run {
        counts,
        relay,
        f: Some(f),
        l,
        r: Some(r),
    }
}

#[test]
fn the_whole_protocol_runs_over_sealed_frames_in_several_chunks() {
    let fd = fed();
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    for i in 0..12 {
        let case = gen_case(&mut rng);
        let negated = i % 2 == 1;
        let params = small_params(case.groups, negated);
        let run = run_relayed(&fd, &case, &params, 1 + i % 7, &mut rng);
        assert_eq!(
            run.counts.released,
            reference(&case, negated, 1),
            "case {i}"
        );
        assert!(run.relay.frames.len() > 3, "chunking was exercised");
    }
}

#[test]
fn the_relay_sees_no_number_no_hash_and_no_testable_point() {
    let fd = fed();
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    let case = gen_case(&mut rng);
    let params = small_params(case.groups, false);
    let run = run_relayed(&fd, &case, &params, 5, &mut rng);
    // Everything the relay must not see: each number's ASCII digits, its SHA-256/512
    // prefix, compress(H(x)) for both sides' numbers and for 20k other candidates, and
    // every blinded point of F, L (with P) and R.
    let mut numbers: Vec<NhsNumber> = case
        .anchor
        .iter()
        .map(|(n, _)| n.clone())
        .chain(case.partner.iter().cloned())
        .filter_map(|n| NhsNumber::parse_opt(n.as_deref()).ok())
        .collect();
    for body in 999_000_000..999_020_000u32 {
        numbers.extend(with_check_digit(body));
    }
    let mut forbidden: HashSet<Vec<u8>> = HashSet::new();
    let mut digits: HashSet<[u8; 10]> = HashSet::new();
    for n in &numbers {
        use sha2::Digest as _;
        digits.insert(*n.digits());
        forbidden.insert(n.to_point().compress().to_bytes().to_vec());
        forbidden.insert(sha2::Sha256::digest(n.digits()).to_vec());
        forbidden.insert(sha2::Sha512::digest(n.digits())[..32].to_vec());
    }
    let f = run.f.as_ref().unwrap();
    let r = run.r.as_ref().unwrap();
    forbidden.extend(f.points.iter().map(|p| p.compress().to_bytes().to_vec()));
    forbidden.insert(run.l.key_share.compress().to_bytes().to_vec());
    forbidden.extend(
        run.l
            .groups
            .iter()
            .flatten()
            .map(|p| p.compress().to_bytes().to_vec()),
    );
    forbidden.extend(r.groups.iter().flatten().map(|c| c.to_bytes().to_vec()));
    assert!(forbidden.len() > 20_000);
    for bytes in run.relay.bytes() {
        for w in bytes.windows(32) {
            assert!(
                !forbidden.contains(w),
                "a testable value crossed the relay in clear"
            );
        }
        for w in bytes.windows(10) {
            assert!(
                !digits.contains(w),
                "an NHS number crossed the relay in clear"
            );
        }
    }
}

/// The frames of one session, in order, and a fresh pair of channels to replay them into.
fn recorded(fd: &Fed) -> (LinkParams, Vec<SealedFrame>, Vec<SealedFrame>) {
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let case = gen_case(&mut rng);
    let params = small_params(case.groups, false);
    let run = run_relayed(fd, &case, &params, 3, &mut rng);
    let to_a: Vec<SealedFrame> = run
        .relay
        .frames
        .iter()
        .filter(|f| f.header().to == *fd.a.node_id())
        .cloned()
        .collect();
    let to_b: Vec<SealedFrame> = run
        .relay
        .frames
        .iter()
        .filter(|f| f.header().to == *fd.b.node_id())
        .cloned()
        .collect();
    (params, to_a, to_b)
}

/// Deliver `frames` to a fresh anchor channel; the index of the first refusal and, once
/// refused, whether any later frame (even a good one) is still refused.
fn deliver_to_anchor(
    fd: &Fed,
    params: &LinkParams,
    frames: &[SealedFrame],
) -> Result<(), (usize, LinkError)> {
    let s = session(fd, params, 1);
    let mut ch = s.channel(&fd.a, Role::Anchor).unwrap();
    for (i, f) in frames.iter().enumerate() {
        if let Err(e) = ch.accept(&fd.a, &fd.verified, f) {
            // Fail closed: nothing more is accepted, not even the next good frame.
            for later in frames {
                assert!(ch.accept(&fd.a, &fd.verified, later).is_err());
            }
            return Err((i, e));
        }
    }
    Ok(())
}

#[test]
fn replayed_reordered_injected_and_resigned_frames_are_refused() {
    let fd = fed();
    let (params, to_a, to_b) = recorded(&fd);
    assert!(to_a.len() >= 4 && !to_b.is_empty());
    assert!(deliver_to_anchor(&fd, &params, &to_a).is_ok());

    // Replayed: the first frame twice.
    let mut replay = to_a.clone();
    replay.insert(1, to_a[0].clone());
    let (i, e) = deliver_to_anchor(&fd, &params, &replay).unwrap_err();
    assert_eq!(i, 1);
    assert!(
        matches!(e, LinkError::Relay(phm_relay::RelayError::Replayed { .. })),
        "{e}"
    );

    // Reordered: the first two frames swapped.
    let mut reorder = to_a.clone();
    reorder.swap(0, 1);
    let (i, e) = deliver_to_anchor(&fd, &params, &reorder).unwrap_err();
    assert_eq!(i, 0);
    assert!(
        matches!(
            e,
            LinkError::Relay(phm_relay::RelayError::OutOfOrder { .. })
        ),
        "{e}"
    );

    // Injected: a frame B never sent, sealed by a third registered node (C) to A in the
    // same session, claiming to be from C...
    let s = session(&fd, &params, 1);
    let mut c_out = phm_relay::Outbox::new(
        phm_relay::SessionContext {
            protocol: phm_relay::Protocol::Link,
            federation_id: s.federation_id.clone(),
            query_digest: s.query_digest,
            session_id: s.session_id,
            first_round: 1,
            last_round: 2,
        },
        &fd.c,
        &[fd.a.node_id().clone()],
    )
    .unwrap();
    let forged_body = to_a[0].ciphertext().to_vec();
    let injected = c_out
        .seal(&fd.c, &fd.verified, fd.a.node_id(), 1, false, &forged_body)
        .unwrap();
    let (i, e) = deliver_to_anchor(&fd, &params, std::slice::from_ref(&injected)).unwrap_err();
    assert_eq!(i, 0);
    assert!(
        matches!(e, LinkError::Relay(phm_relay::RelayError::NotAPeer(_))),
        "{e}"
    );

    // ...or re-signed by C under B's name: B's header and ciphertext, C's signature.
    let resigned = SealedFrame::from_parts(
        to_a[0].header().clone(),
        to_a[0].enc(),
        to_a[0].ciphertext().to_vec(),
        injected.signature(),
    )
    .unwrap();
    let (_, e) = deliver_to_anchor(&fd, &params, &[resigned]).unwrap_err();
    assert!(
        matches!(
            e,
            LinkError::Relay(phm_relay::RelayError::BadSignature { .. })
        ),
        "{e}"
    );

    // A frame from another session (same nodes, another nonce) is refused too.
    let other = session(&fd, &params, 2);
    let mut ch = other.channel(&fd.a, Role::Anchor).unwrap();
    assert!(matches!(
        ch.accept(&fd.a, &fd.verified, &to_a[0]),
        Err(LinkError::Relay(phm_relay::RelayError::WrongSession { .. }))
    ));

    // A frame for B is refused by A, and B's frames cannot be delivered to A.
    let (_, e) = deliver_to_anchor(&fd, &params, &to_b[..1]).unwrap_err();
    assert!(
        matches!(
            e,
            LinkError::Relay(phm_relay::RelayError::WrongRecipient { .. })
        ),
        "{e}"
    );

    // Different parameters mean a different session: nothing opens.
    let mut p2 = params.clone();
    p2.negated = true;
    let (_, e) = deliver_to_anchor(&fd, &p2, &to_a).unwrap_err();
    assert!(
        matches!(
            e,
            LinkError::Relay(phm_relay::RelayError::WrongSession { .. })
        ),
        "{e}"
    );
}

#[test]
fn a_channel_refuses_the_wrong_role_and_node() {
    let fd = fed();
    let params = small_params(1, false);
    let s = session(&fd, &params, 1);
    assert!(s.channel(&fd.b, Role::Anchor).is_err());
    assert!(s.channel(&fd.c, Role::Partner).is_err());
    let mut a = s.channel(&fd.a, Role::Anchor).unwrap();
    let r = RoundR {
        groups: vec![vec![]],
    };
    assert!(a.send_r(&fd.a, &fd.verified, &r).is_err());
}

// ---------------------------------------------------------------------------------------
// Decoding

fn point(seed: u64) -> curve25519_dalek::ristretto::RistrettoPoint {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    curve25519_dalek::ristretto::RistrettoPoint::random(&mut rng)
}

#[test]
fn messages_round_trip_through_their_encoding_in_any_chunking() {
    let f = RoundF {
        points: (0..10).map(point).collect(),
    };
    let l = RoundL {
        key_share: point(100),
        groups: vec![
            (10..13).map(point).collect(),
            vec![],
            (13..20).map(point).collect(),
        ],
    };
    let r = RoundR {
        groups: vec![
            (20..25).map(|s| point(s).compress()).collect(),
            vec![],
            vec![point(30).compress()],
        ],
    };
    for per in [1, 2, 3, 7, 100] {
        let fc = f.chunks_of(per);
        assert_eq!(fc.len(), 10usize.div_ceil(per));
        assert!(RoundF::from_chunks(fc.iter().map(Vec::as_slice), 100).unwrap() == f);
        let lc = l.chunks_of(per);
        assert!(RoundL::from_chunks(lc.iter().map(Vec::as_slice), 3, 100).unwrap() == l);
        let rc = r.chunks_of(per);
        assert!(RoundR::from_chunks(rc.iter().map(Vec::as_slice), 3, 100).unwrap() == r);
    }
    // An empty message is one chunk with no segments.
    let empty = RoundF { points: vec![] };
    assert_eq!(empty.to_chunks().len(), 1);
    assert!(
        RoundF::from_chunks(empty.to_chunks().iter().map(Vec::as_slice), 0)
            .unwrap()
            .is_empty()
    );
}

fn decode_f(chunk: &[u8]) -> DecodeError {
    RoundF::from_chunks([chunk], 100).unwrap_err()
}

/// An F chunk with `points` in group 0.
fn f_chunk(points: &[[u8; 32]]) -> Vec<u8> {
    let mut v = vec![1, 1, 0, 0, 0, 1, 0, 0, 0, 0];
    if points.is_empty() {
        v.extend_from_slice(&0u32.to_be_bytes());
        return v;
    }
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&(points.len() as u32).to_be_bytes());
    for p in points {
        v.extend_from_slice(p);
    }
    v
}

#[test]
fn decoding_refuses_malformed_messages() {
    let good = point(1).compress().to_bytes();
    let other = point(2).compress().to_bytes();
    let ok = f_chunk(&[good, other]);
    assert_eq!(RoundF::from_chunks([ok.as_slice()], 100).unwrap().len(), 2);
    assert_eq!(
        ok,
        RoundF {
            points: vec![point(1), point(2)]
        }
        .to_chunks()[0],
        "the encoding is canonical"
    );

    assert!(matches!(
        decode_f(&ok[..ok.len() - 1]),
        DecodeError::Truncated { .. }
    ));
    assert!(matches!(
        decode_f(&[ok.clone(), vec![0]].concat()),
        DecodeError::TrailingBytes { extra: 1 }
    ));
    assert!(matches!(decode_f(&[]), DecodeError::Truncated { at: 0 }));
    let mut v = ok.clone();
    v[0] = 2;
    assert_eq!(decode_f(&v), DecodeError::Version(2));
    v = ok.clone();
    v[1] = 9;
    assert_eq!(decode_f(&v), DecodeError::UnknownKind(9));
    v = ok.clone();
    v[1] = 3;
    assert!(matches!(decode_f(&v), DecodeError::WrongKind { .. }));
    v = ok.clone();
    v[5] = 2;
    assert!(matches!(decode_f(&v), DecodeError::WrongGroupCount { .. }));
    v = ok.clone();
    v[9] = 1;
    assert!(matches!(
        decode_f(&v),
        DecodeError::ChunkOrder {
            expected: 0,
            got: 1
        }
    ));
    // A non-canonical encoding (all 0xff is not a field element) and the identity.
    assert!(matches!(
        decode_f(&f_chunk(&[good, [0xff; 32]])),
        DecodeError::NonCanonicalPoint { index: 1 }
    ));
    assert!(matches!(
        decode_f(&f_chunk(&[[0; 32]])),
        DecodeError::IdentityPoint { index: 0 }
    ));
    assert!(matches!(
        decode_f(&f_chunk(&[good, other, good])),
        DecodeError::Duplicate { index: 2 }
    ));
    // Over the caller's cap, and a count that lies about the bytes that follow.
    assert!(matches!(
        RoundF::from_chunks([ok.as_slice()], 1).unwrap_err(),
        DecodeError::TooManyElements { max: 1 }
    ));
    v = ok.clone();
    v[21] = 0xff; // count low byte: 255 points claimed, 2 present
    assert!(matches!(
        RoundF::from_chunks([v.as_slice()], 1000).unwrap_err(),
        DecodeError::Truncated { .. }
    ));
    v = ok.clone();
    v[18..22].copy_from_slice(&(1u32 << 20).to_be_bytes());
    assert!(matches!(decode_f(&v), DecodeError::ChunkTooLarge { .. }));
    v = ok.clone();
    v[18..22].copy_from_slice(&0u32.to_be_bytes());
    v.truncate(22);
    assert!(matches!(
        decode_f(&v),
        DecodeError::EmptySegment { group: 0 }
    ));
    v = ok.clone();
    v[17] = 1;
    assert!(matches!(
        decode_f(&v),
        DecodeError::GroupOutOfRange {
            group: 1,
            groups: 1
        }
    ));
    assert_eq!(
        RoundF::from_chunks(std::iter::empty(), 10).unwrap_err(),
        DecodeError::Empty
    );

    // L: the key share must be in chunk 0 and only there; groups in order.
    let l = RoundL {
        key_share: point(3),
        groups: vec![vec![point(4)], vec![point(5)]],
    };
    let lc = l.chunks_of(1);
    assert_eq!(lc.len(), 2);
    let mut first = lc[0].clone();
    first[10] = 0;
    first.drain(11..43);
    assert_eq!(
        RoundL::from_chunks([first.as_slice()], 2, 10).unwrap_err(),
        DecodeError::MissingKeyShare
    );
    let mut second = lc[1].clone();
    second[10] = 1;
    assert_eq!(
        RoundL::from_chunks([lc[0].as_slice(), second.as_slice()], 2, 10).unwrap_err(),
        DecodeError::UnexpectedKeyShare
    );
    // Group 1 then group 0.
    let swapped = RoundL {
        key_share: point(3),
        groups: vec![vec![point(5)], vec![point(4)]],
    };
    let sc = swapped.chunks_of(1);
    let mut a = Assembler::new(MessageKind::AnchorSet, 2, 10);
    let mut late = sc[0].clone();
    late[47..51].copy_from_slice(&1u32.to_be_bytes());
    a.push(&late).unwrap();
    let mut early = sc[1].clone();
    early[15..19].copy_from_slice(&0u32.to_be_bytes());
    assert!(matches!(
        a.push(&early).unwrap_err(),
        DecodeError::GroupOrder {
            previous: 1,
            group: 0
        }
    ));
    // The key share may not repeat an element either.
    let dup = RoundL {
        key_share: point(4),
        groups: vec![vec![point(4)], vec![]],
    };
    assert!(matches!(
        RoundL::from_chunks(dup.to_chunks().iter().map(Vec::as_slice), 2, 10).unwrap_err(),
        DecodeError::Duplicate { .. }
    ));
}

#[test]
fn the_anchor_refuses_a_reply_of_the_wrong_size() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let case = gen_case(&mut rng);
    let params = small_params(case.groups, false);
    let (a, b) = cohorts(&case);
    let (anchor, l) = Anchor::start(&params, &a, &mut ZeroNoise, &mut rng).unwrap();
    let (partner, f) = Partner::start(&params, &b, &mut ZeroNoise, &mut rng).unwrap();
    let anchor = anchor.receive_f(f).unwrap();
    let mut r = partner.receive_l(l, &mut rng).unwrap();
    r.groups[0].push(CompressedRistretto(point(77).compress().to_bytes()));
    assert!(matches!(
        anchor.receive_r(r),
        Err(LinkError::ReplySize { group: 0, .. })
    ));
}

#[test]
fn every_rs_file_opens_with_a_doc_comment_and_has_no_trailing_whitespace() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("//!"), "{}", path.display());
        assert!(
            !text.lines().any(|l| l.ends_with(' ')),
            "{}",
            path.display()
        );
    }
}

/// Timing note, not a gate: `cargo test --release -p phm-link -- --ignored bench_ --nocapture`.
#[test]
#[ignore]
fn bench_100k_by_10k_five_groups() {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    // Distinct valid numbers, in order through the test range.
    let mut numbers = (999_000_000..=999_999_999u32)
        .filter_map(with_check_digit)
        .map(|n| Some(String::from_utf8(n.digits().to_vec()).unwrap()));
    let anchor: Vec<(Option<String>, usize)> =
        numbers.by_ref().take(100_000).zip((0..5).cycle()).collect();
    let mut partner: Vec<Option<String>> =
        anchor.iter().step_by(20).map(|(n, _)| n.clone()).collect();
    partner.extend(numbers.take(5_000));
    let case = Case {
        groups: 5,
        anchor,
        partner,
    };
    let params = LinkParams::for_query(5, 1.0, 1e-9, 1e-9, false, 2_000_000).unwrap();
    let (a, b) = cohorts(&case);
    let fd = fed();
    let t = std::time::Instant::now();
    let run = run_relayed(&fd, &case, &params, MAX_CHUNK_ELEMENTS, &mut rng);
    let took = t.elapsed();
    assert_eq!(run.counts.released, reference(&case, false, 1));
    let bytes: usize = run.relay.frames.iter().map(SealedFrame::encoded_len).sum();
    println!(
        "bench 100k x 10k (5 groups, μ_link {}, μ_size {}): {:.2} s wall over sealed frames, {} frames, {:.1} MB relayed; anchor {} people, partner {}",
        params.link.mu(),
        params.size.mu(),
        took.as_secs_f64(),
        run.relay.frames.len(),
        bytes as f64 / 1e6,
        a.stats().people,
        b.stats().people,
    );
}
