//! The mask PRG and the key derivations: HKDF-SHA256 keyed by the session, then the raw
//! RFC 8439 ChaCha20 keystream.
//!
//! Node and coordinator must produce bit-identical masks (the coordinator regenerates the
//! self masks of survivors and the pairwise masks of dropped nodes), so the construction is
//! fixed here and pinned by known-answer tests computed with an independent implementation
//! (Python's `hmac`/`hashlib` HKDF and OpenSSL's ChaCha20):
//!
//! key = HKDF-SHA256(salt = session_id, ikm = seed, info = canonical(label, ids…)) (32 bytes)
//! mask[i] = u64::from_le_bytes(ChaCha20(key, nonce = 0^96, counter = 0)[8i..8i+8])
//!
//! Eight little-endian bytes per coordinate are exactly uniform mod 2^64 (no rejection
//! needed). The session id as salt means no mask, and no share key, is ever reused across
//! sessions, even if a node reused a key by mistake.

use chacha20::ChaCha20;
use chacha20::cipher::{KeyIvInit as _, StreamCipher as _};
use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::canon::Canon;
use phm_relay::NodeId;

/// HKDF `info` label of a node's self mask PRG(b_u).
const SELF_MASK_LABEL: &str = "phm-secagg/v1 self mask";
/// HKDF `info` label of a pairwise mask PRG(s_uv).
const PAIR_MASK_LABEL: &str = "phm-secagg/v1 pair mask";
/// HKDF `info` label of the R1 share-encryption key from u to v.
const SHARE_KEY_LABEL: &str = "phm-secagg/v1 share key";

/// HKDF-SHA256 with the session id as salt: 32 bytes, wiped on drop.
pub(crate) fn derive_key(session_id: &[u8; 32], ikm: &[u8], info: &[u8]) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(session_id), ikm);
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 255·32-byte limit, so expand cannot fail; the
    // branch keeps the no-unwrap rule and would leave an all-zero key only in an
    // impossible case, which no caller could then open anything with.
    if hk.expand(info, &mut okm[..]).is_err() {
        okm.fill(0);
    }
    okm
}

/// `dim` words of the ChaCha20 keystream under `key`.
pub(crate) fn keystream(key: &[u8; 32], dim: usize) -> Vec<u64> {
    let mut cipher = ChaCha20::new(key.into(), &[0u8; 12].into());
    let mut bytes = Zeroizing::new(vec![0u8; dim * 8]);
    cipher.apply_keystream(&mut bytes);
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
        .collect()
}

/// PRG(b_u): the self mask of node `u`.
pub(crate) fn self_mask(session_id: &[u8; 32], b_u: &[u8; 32], u: &NodeId, dim: usize) -> Vec<u64> {
    let mut info = Canon::new(SELF_MASK_LABEL);
    info.bytes(u.as_str().as_bytes());
    keystream(&derive_key(session_id, b_u, &info.finish()), dim)
}

/// PRG(s_uv): the pairwise mask of u and v (symmetric: the ids go in sorted order).
pub(crate) fn pair_mask(
    session_id: &[u8; 32],
    shared: &[u8; 32],
    u: &NodeId,
    v: &NodeId,
    dim: usize,
) -> Vec<u64> {
    let (lo, hi) = if u < v { (u, v) } else { (v, u) };
    let mut info = Canon::new(PAIR_MASK_LABEL);
    info.bytes(lo.as_str().as_bytes())
        .bytes(hi.as_str().as_bytes());
    keystream(&derive_key(session_id, shared, &info.finish()), dim)
}

/// The key that encrypts u's R1 shares for v. Direction-specific (`from`, `to` in that
/// order), so u→v and v→u, which share one DH secret, never share a key and the fixed
/// nonce of [`crate::crypto`] is never reused.
pub(crate) fn share_key(
    session_id: &[u8; 32],
    shared: &[u8; 32],
    from: &NodeId,
    to: &NodeId,
) -> Zeroizing<[u8; 32]> {
    let mut info = Canon::new(SHARE_KEY_LABEL);
    info.bytes(from.as_str().as_bytes())
        .bytes(to.as_str().as_bytes());
    derive_key(session_id, shared, &info.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    /// Raw ChaCha20 against RFC 8439 §2.4.2 (key 00..1f, nonce 00000000 0000004a 00000000,
    /// counter 1): the keystream starts 22 4f 51 f3 …
    #[test]
    fn chacha20_is_rfc8439() {
        use chacha20::cipher::StreamCipherSeek as _;
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let nonce = [0, 0, 0, 0, 0, 0, 0, 0x4a, 0, 0, 0, 0];
        let mut c = ChaCha20::new(&key.into(), &nonce.into());
        c.seek(64u64);
        let mut buf = [0u8; 16];
        c.apply_keystream(&mut buf);
        assert_eq!(hex(&buf), "224f51f3401bd9e12fde276fb8631ded");
    }

    /// HKDF + ChaCha20 as node and coordinator run it; values from Python/OpenSSL.
    #[test]
    fn pair_mask_known_answer() {
        let sid = [0x11u8; 32];
        let shared = [0x22u8; 32];
        let (a, b) = (id("A81001"), id("A81002"));
        let mut info = Canon::new(PAIR_MASK_LABEL);
        info.bytes(b"A81001").bytes(b"A81002");
        assert_eq!(
            hex(&derive_key(&sid, &shared, &info.finish())[..]),
            "470957e73b82d8dadb72df4a7a5bf0710535adfc3e74a3803dea6ae5c26c712b"
        );
        let m = pair_mask(&sid, &shared, &a, &b, 100);
        assert_eq!(
            &m[..5],
            &[
                0x186c32c59054bb14,
                0xa869e706ffba77a7,
                0xef324b71a53246d0,
                0xf6471875c86d0a28,
                0x28a2b758d71ee164
            ]
        );
        // Word 70 lies in the ninth 64-byte block: the block counter advances as RFC 8439's.
        assert_eq!(m[70], 0xefeca0d8bd12f73f);
        // Symmetric in the pair, and a prefix of a longer stream.
        assert_eq!(pair_mask(&sid, &shared, &b, &a, 5), m[..5].to_vec());
        // Another session gives unrelated words.
        assert_ne!(pair_mask(&[0x12; 32], &shared, &a, &b, 1)[0], m[0]);
    }

    #[test]
    fn share_keys_are_direction_specific() {
        let (a, b) = (id("a"), id("b"));
        let k1 = share_key(&[1; 32], &[2; 32], &a, &b);
        let k2 = share_key(&[1; 32], &[2; 32], &b, &a);
        assert_ne!(*k1, *k2);
        assert_ne!(
            self_mask(&[1; 32], &[2; 32], &a, 1),
            self_mask(&[1; 32], &[2; 32], &b, 1)
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
