//! The cryptographic pieces the rounds are built from: X25519 key agreement, Shamir
//! shares (vsss-rs over the scalar field of curve25519) and the R1 share encryption
//! (ChaCha20-Poly1305).
//!
//! The two secrets a node shares (its s-key and its self-mask seed b_u) are drawn as
//! canonical scalars mod ℓ = 2^252 + … ([`secret`]), so each is one field element and a
//! share is one evaluation of a polynomial over that field: x, then 32 bytes, as before.
//! The first version shared arbitrary 32-byte strings over GF(2^8), one polynomial per
//! byte; splitting and combining were a quarter of a 100-node session's CPU time
//! (BENCHMARKS.md, "Secure aggregation"). An X25519 key from a scalar keeps ≥ 249 bits
//! of entropy after clamping; a PRG seed keeps 252.
//!
//! R1 shares are encrypted under a key derived from the *ephemeral* c-key agreement
//! (Bonawitz et al.'s design), not sealed as `phm-relay` frames to the long-term registry
//! HPKE key; see PROTOCOL.md "Why shares are not relay frames" for the reasons (forward
//! secrecy against a coordinator that records ciphertexts and later obtains identity keys;
//! one agreement per pair instead of HPKE's two plus a signature). The c-keys themselves
//! are authenticated by the node's registry identity through `phm-relay`'s statement
//! signature, so only u and v can derive the key.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use curve25519_dalek::Scalar;
use phm_relay::NodeId;
use rand_core::{CryptoRng, RngCore};
use vsss_rs::curve25519::WrappedScalar;
use vsss_rs::{DefaultShare, IdentifierPrimeField, ReadableShareSet, Share as _};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::canon::Canon;
use crate::error::SecAggError;
use crate::prg::share_key;

/// Bytes of one Shamir share of a secret: the x-coordinate, then the share's value as a
/// canonical little-endian scalar.
pub const SHARE_LEN: usize = 33;
/// Bytes of one R1 ciphertext: two shares and the Poly1305 tag.
pub const SHARE_CIPHERTEXT_LEN: usize = 2 * SHARE_LEN + 16;

/// AEAD associated-data label of an R1 ciphertext.
const SHARE_AAD_LABEL: &str = "phm-secagg/v1 share aad";

/// One Shamir share of a 32-byte secret (s_u^SK or b_u). Wiped on drop; `Debug` shows only
/// the x-coordinate.
#[derive(Clone, PartialEq, Eq)]
pub struct Share(Zeroizing<[u8; SHARE_LEN]>);

impl std::fmt::Debug for Share {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Share(x = {})", self.0[0])
    }
}

impl Share {
    /// From its wire bytes (x-coordinate first). x = 0 would be the secret itself; a value
    /// that is not a canonical scalar is no share.
    pub fn from_bytes(bytes: &[u8]) -> Option<Share> {
        let arr: [u8; SHARE_LEN] = bytes.try_into().ok()?;
        if arr[0] == 0 || value_of(&arr).is_none() {
            return None;
        }
        Some(Share(Zeroizing::new(arr)))
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8; SHARE_LEN] {
        &self.0
    }

    /// The x-coordinate: the holder's position in the sorted cohort, from 1.
    pub fn x(&self) -> u8 {
        self.0[0]
    }
}

/// A share as vsss-rs holds it: identifier and value in the scalar field.
type FieldShare =
    DefaultShare<IdentifierPrimeField<WrappedScalar>, IdentifierPrimeField<WrappedScalar>>;

fn value_of(bytes: &[u8; SHARE_LEN]) -> Option<Scalar> {
    let mut v = Zeroizing::new([0u8; 32]);
    v.copy_from_slice(&bytes[1..]);
    Option::from(Scalar::from_canonical_bytes(*v))
}

/// A fresh secret to share: a uniform scalar mod ℓ, as its canonical 32 bytes.
pub(crate) fn secret<R: RngCore + CryptoRng>(
    rng: &mut R,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let mut wide = Zeroizing::new([0u8; 64]);
    rng.try_fill_bytes(&mut wide[..])
        .map_err(|e| SecAggError::Rng(e.to_string()))?;
    Ok(Zeroizing::new(
        Scalar::from_bytes_mod_order_wide(&wide).to_bytes(),
    ))
}

/// Split a secret from [`secret`] into `n` shares, any `t` of which recover it; share i
/// (from 0) has x-coordinate i + 1.
pub(crate) fn split<R: RngCore + CryptoRng>(
    secret: &[u8; 32],
    t: usize,
    n: usize,
    rng: &mut R,
) -> Result<Vec<Share>, SecAggError> {
    if n > usize::from(u8::MAX) {
        return Err(SecAggError::Sharing(format!(
            "{n} shares: at most 255 fit a one-byte x-coordinate"
        )));
    }
    let value: Option<Scalar> = Scalar::from_canonical_bytes(*secret).into();
    let value = value.ok_or_else(|| SecAggError::Sharing("the secret is not a scalar".into()))?;
    let secret = IdentifierPrimeField(WrappedScalar(value));
    let shares: Vec<FieldShare> = vsss_rs::shamir::split_secret(t, n, &secret, rng)
        .map_err(|e| SecAggError::Sharing(format!("{e:?}")))?;
    shares
        .iter()
        .enumerate()
        .map(|(i, sh)| {
            // vsss-rs numbers participants 1, 2, …; the wire's x must say the same.
            let x = u8::try_from(i + 1).map_err(|_| SecAggError::Sharing("x > 255".into()))?;
            if sh.identifier().0.0 != Scalar::from(x) {
                return Err(SecAggError::Sharing(format!("share {i} is not at x = {x}")));
            }
            let mut bytes = Zeroizing::new([0u8; SHARE_LEN]);
            bytes[0] = x;
            bytes[1..].copy_from_slice(&sh.value().0.0.to_bytes());
            Ok(Share(bytes))
        })
        .collect()
}

/// Recover a secret from shares with distinct x-coordinates (at least the threshold).
pub(crate) fn combine(shares: &[&Share]) -> Result<Zeroizing<[u8; 32]>, String> {
    let mut xs: Vec<u8> = shares.iter().map(|s| s.x()).collect();
    xs.sort_unstable();
    xs.dedup();
    if xs.len() != shares.len() || shares.len() < 2 {
        return Err("shares must have distinct x-coordinates, at least two".into());
    }
    let field: Vec<FieldShare> = shares
        .iter()
        .map(|s| {
            let v = value_of(&s.0).ok_or("a share's value is not a scalar")?;
            Ok(FieldShare::with_identifier_and_value(
                IdentifierPrimeField(WrappedScalar(Scalar::from(s.x()))),
                IdentifierPrimeField(WrappedScalar(v)),
            ))
        })
        .collect::<Result<_, String>>()?;
    let secret = field.combine().map_err(|e| format!("{e:?}"))?;
    Ok(Zeroizing::new(secret.0.0.to_bytes()))
}

/// A fresh X25519 key pair.
pub(crate) fn keypair<R: RngCore + CryptoRng>(rng: &mut R) -> (StaticSecret, [u8; 32]) {
    let sk = StaticSecret::random_from_rng(rng);
    let pk = PublicKey::from(&sk).to_bytes();
    (sk, pk)
}

/// A fresh X25519 key pair whose secret is a [`secret`] scalar, so it can be shared.
pub(crate) fn shareable_keypair<R: RngCore + CryptoRng>(
    rng: &mut R,
) -> Result<(StaticSecret, [u8; 32]), SecAggError> {
    let sk = StaticSecret::from(*secret(rng)?);
    let pk = PublicKey::from(&sk).to_bytes();
    Ok((sk, pk))
}

/// X25519(sk, peer), refusing a low-order peer key (all-zero output).
pub(crate) fn agree(
    sk: &StaticSecret,
    peer_pk: &[u8; 32],
    peer: &NodeId,
) -> Result<Zeroizing<[u8; 32]>, SecAggError> {
    let shared = sk.diffie_hellman(&PublicKey::from(*peer_pk));
    if !shared.was_contributory() {
        return Err(SecAggError::LowOrderKey(peer.clone()));
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

fn share_aad(session_id: &[u8; 32], from: &NodeId, to: &NodeId) -> Vec<u8> {
    let mut c = Canon::new(SHARE_AAD_LABEL);
    c.bytes(session_id)
        .bytes(from.as_str().as_bytes())
        .bytes(to.as_str().as_bytes());
    c.finish()
}

/// Encrypt u's shares for v. The key is unique to (session, from, to) and each node sends
/// each peer exactly one R1 message, so the all-zero nonce is used once per key.
pub(crate) fn seal_shares(
    session_id: &[u8; 32],
    c_shared: &[u8; 32],
    from: &NodeId,
    to: &NodeId,
    s_share: &Share,
    b_share: &Share,
) -> Result<Vec<u8>, SecAggError> {
    let key = share_key(session_id, c_shared, from, to);
    let cipher = ChaCha20Poly1305::new((&*key).into());
    let mut pt = Zeroizing::new([0u8; 2 * SHARE_LEN]);
    pt[..SHARE_LEN].copy_from_slice(s_share.as_bytes());
    pt[SHARE_LEN..].copy_from_slice(b_share.as_bytes());
    let aad = share_aad(session_id, from, to);
    cipher
        .encrypt(
            &[0u8; 12].into(),
            Payload {
                msg: &pt[..],
                aad: &aad,
            },
        )
        .map_err(|_| SecAggError::Sharing("share encryption failed".into()))
}

/// Open v's shares for this node, from `from`.
pub(crate) fn open_shares(
    session_id: &[u8; 32],
    c_shared: &[u8; 32],
    from: &NodeId,
    to: &NodeId,
    ciphertext: &[u8],
) -> Result<(Share, Share), SecAggError> {
    let bad = || SecAggError::ShareDecrypt(from.clone());
    if ciphertext.len() != SHARE_CIPHERTEXT_LEN {
        return Err(bad());
    }
    let key = share_key(session_id, c_shared, from, to);
    let cipher = ChaCha20Poly1305::new((&*key).into());
    let aad = share_aad(session_id, from, to);
    let pt = Zeroizing::new(
        cipher
            .decrypt(
                &[0u8; 12].into(),
                Payload {
                    msg: ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| bad())?,
    );
    let s = Share::from_bytes(&pt[..SHARE_LEN]).ok_or_else(bad)?;
    let b = Share::from_bytes(&pt[SHARE_LEN..]).ok_or_else(bad)?;
    Ok((s, b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng as _;

    #[test]
    fn any_threshold_subset_recovers_and_fewer_do_not() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        assert!(
            split(&[0xA5u8; 32], 3, 5, &mut rng).is_err(),
            "not a scalar"
        );
        let secret = *super::secret(&mut rng).unwrap();
        let shares = split(&secret, 3, 5, &mut rng).unwrap();
        assert_eq!(
            shares.iter().map(Share::x).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let pick = |ix: &[usize]| ix.iter().map(|&i| &shares[i]).collect::<Vec<_>>();
        assert_eq!(*combine(&pick(&[0, 2, 4])).unwrap(), secret);
        assert_eq!(*combine(&pick(&[4, 1, 3, 0])).unwrap(), secret);
        assert_ne!(*combine(&pick(&[0, 1])).unwrap(), secret);
        assert!(combine(&pick(&[0, 0, 1])).is_err());
        assert!(Share::from_bytes(&[0u8; SHARE_LEN]).is_none());
        let mut not_scalar = [0xFFu8; SHARE_LEN];
        not_scalar[0] = 1;
        assert!(Share::from_bytes(&not_scalar).is_none());
    }

    #[test]
    fn share_ciphertexts_are_bound_to_session_and_direction() {
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let shares = split(&[1u8; 32], 2, 2, &mut rng).unwrap();
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let ct = seal_shares(&[9; 32], &[3; 32], &a, &b, &shares[0], &shares[1]).unwrap();
        assert_eq!(ct.len(), SHARE_CIPHERTEXT_LEN);
        let (s, bb) = open_shares(&[9; 32], &[3; 32], &a, &b, &ct).unwrap();
        assert_eq!((s, bb), (shares[0].clone(), shares[1].clone()));
        assert!(open_shares(&[8; 32], &[3; 32], &a, &b, &ct).is_err());
        assert!(open_shares(&[9; 32], &[3; 32], &b, &a, &ct).is_err());
    }

    #[test]
    fn low_order_keys_are_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        let (sk, _) = keypair(&mut rng);
        let id = NodeId::new("x").unwrap();
        assert_eq!(
            agree(&sk, &[0u8; 32], &id),
            Err(SecAggError::LowOrderKey(id))
        );
    }
}
