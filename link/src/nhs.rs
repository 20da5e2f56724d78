//! NHS numbers: normalising, the mod-11 check digit, and the one hash to the group.
//!
//! A record whose number is missing or invalid is *unlinkable*: it is counted by reason
//! (so the node can say what was missed) and never hashed, because a malformed value
//! would never match anyway and hashing it only adds a point an attacker might test.

use std::fmt;

use curve25519_dalek::ristretto::RistrettoPoint;
use sha2::Sha512;

/// Domain-separation prefix of [`NhsNumber::to_point`]. Versioned: a change of encoding is
/// a new label, so points of two versions can never match by accident.
pub const HASH_DST: &[u8] = b"phm-link/v1/nhs_number\0";

/// A valid NHS number: ten ASCII digits whose last is the mod-11 check digit of the
/// first nine, and not a placeholder of one repeated digit.
///
/// `Debug` and `Display` never print the digits: an NHS number is personal data and must
/// not reach a log through a `{:?}`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NhsNumber([u8; 10]);

/// Why a record cannot be linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unlinkable {
    /// No number, or only spaces.
    Missing,
    /// Not ten digits after removing spaces.
    Malformed,
    /// Ten digits, but the check digit is wrong (or the remainder is 10, which no issued
    /// number has).
    BadCheckDigit,
    /// Ten copies of one digit (such as `0000000000`), which passes mod 11 for some digits
    /// but is a "not known" placeholder: linking on it would join unrelated people.
    Placeholder,
}

impl NhsNumber {
    /// Normalise and validate: ASCII spaces are removed (numbers are often written
    /// `943 476 5919`); anything else that is not a digit makes the value malformed.
    pub fn parse(raw: &str) -> Result<NhsNumber, Unlinkable> {
        let mut digits = [0u8; 10];
        let mut n = 0usize;
        for b in raw.bytes() {
            if b == b' ' {
                continue;
            }
            if !b.is_ascii_digit() || n == 10 {
                return Err(Unlinkable::Malformed);
            }
            digits[n] = b;
            n += 1;
        }
        match n {
            0 if raw.bytes().all(|b| b == b' ') => return Err(Unlinkable::Missing),
            10 => {}
            _ => return Err(Unlinkable::Malformed),
        }
        if digits.iter().all(|&d| d == digits[0]) {
            return Err(Unlinkable::Placeholder);
        }
        if check_digit(&digits) != Some(digits[9] - b'0') {
            return Err(Unlinkable::BadCheckDigit);
        }
        Ok(NhsNumber(digits))
    }

    /// [`NhsNumber::parse`] for an optional field: `None` is [`Unlinkable::Missing`].
    pub fn parse_opt(raw: Option<&str>) -> Result<NhsNumber, Unlinkable> {
        raw.map_or(Err(Unlinkable::Missing), NhsNumber::parse)
    }

    /// The ten ASCII digits. For the node's own use (tests, the reference join); they
    /// must never be sent anywhere.
    pub fn digits(&self) -> &[u8; 10] {
        &self.0
    }

    /// `H(x) = RistrettoPoint::hash_from_bytes::<Sha512>(HASH_DST ‖ ten ASCII digits)`: the
    /// Elligator map of a 64-byte hash, whose output has an unknown discrete logarithm.
    /// (Never `x·G`: with a known logarithm a partner could compute `a·H(x*) = x*·(a·G)`
    /// for any number it likes.)
    pub fn to_point(&self) -> RistrettoPoint {
        let mut input = [0u8; HASH_DST.len() + 10];
        input[..HASH_DST.len()].copy_from_slice(HASH_DST);
        input[HASH_DST.len()..].copy_from_slice(&self.0);
        RistrettoPoint::hash_from_bytes::<Sha512>(&input)
    }
}

/// The mod-11 check digit of the first nine digits: weights 10 down to 2, then
/// `11 − (sum mod 11)`, where 11 means 0 and 10 means the body is never issued.
fn check_digit(digits: &[u8; 10]) -> Option<u8> {
    let sum: u32 = digits[..9]
        .iter()
        .zip((2..=10u32).rev())
        .map(|(&d, w)| u32::from(d - b'0') * w)
        .sum();
    match 11 - sum % 11 {
        11 => Some(0),
        10 => None,
        // 1..=9, so the narrowing cannot lose anything.
        c => u8::try_from(c).ok(),
    }
}

impl fmt::Debug for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NhsNumber(<redacted>)")
    }
}

impl fmt::Display for NhsNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<NHS number>")
    }
}

/// Make a valid number from a nine-digit body, or `None` if the body's remainder is 10.
/// For synthetic data and tests: every body in the official test range 999 000 000 –
/// 999 999 999 gives at most one valid number.
pub fn with_check_digit(body: u32) -> Option<NhsNumber> {
    if body > 999_999_999 {
        return None;
    }
    let mut digits = [0u8; 10];
    let text = format!("{body:09}");
    digits[..9].copy_from_slice(text.as_bytes());
    let c = check_digit(&digits)?;
    digits[9] = b'0' + c;
    if digits.iter().all(|&d| d == digits[0]) {
        return None;
    }
    Some(NhsNumber(digits))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn known_numbers_validate_and_normalise() {
        // 943 476 5919 is the NHS's own documented example.
        let n = NhsNumber::parse("943 476 5919").unwrap();
        assert_eq!(n.digits(), b"9434765919");
        assert_eq!(NhsNumber::parse("9434765919").unwrap(), n);
        assert_eq!(
            NhsNumber::parse("9434765918"),
            Err(Unlinkable::BadCheckDigit)
        );
        assert_eq!(NhsNumber::parse(""), Err(Unlinkable::Missing));
        assert_eq!(NhsNumber::parse("   "), Err(Unlinkable::Missing));
        assert_eq!(NhsNumber::parse_opt(None), Err(Unlinkable::Missing));
        assert_eq!(NhsNumber::parse("943-476-5919"), Err(Unlinkable::Malformed));
        assert_eq!(NhsNumber::parse("943476591"), Err(Unlinkable::Malformed));
        assert_eq!(NhsNumber::parse("94347659190"), Err(Unlinkable::Malformed));
        assert_eq!(
            NhsNumber::parse("０９４３４７６５９１"),
            Err(Unlinkable::Malformed)
        );
        assert_eq!(NhsNumber::parse("0000000000"), Err(Unlinkable::Placeholder));
    }

    #[test]
    fn the_check_digit_matches_a_brute_force_over_every_tenth_digit() {
        // For a sample of bodies, exactly the digit `with_check_digit` picks validates
        // (or none does when the remainder is 10).
        for body in (0..999_999_999u32).step_by(7_919_993) {
            let valid: Vec<u8> = (0..10u8)
                .filter(|d| NhsNumber::parse(&format!("{body:09}{d}")).is_ok())
                .collect();
            match with_check_digit(body) {
                Some(n) => assert_eq!(valid, vec![n.digits()[9] - b'0']),
                None => assert!(valid.len() <= 1),
            }
        }
    }

    #[test]
    fn debug_and_display_never_show_digits() {
        let n = NhsNumber::parse("9434765919").unwrap();
        let shown = format!("{n:?} {n}");
        assert!(!shown.bytes().any(|b| b.is_ascii_digit()), "{shown}");
    }

    #[test]
    fn the_hash_is_pinned_and_domain_separated() {
        let n = NhsNumber::parse("9434765919").unwrap();
        let expected =
            RistrettoPoint::hash_from_bytes::<Sha512>(b"phm-link/v1/nhs_number\x009434765919");
        assert_eq!(n.to_point(), expected);
        let other = RistrettoPoint::hash_from_bytes::<Sha512>(b"9434765919");
        assert_ne!(n.to_point(), other);
    }
}
