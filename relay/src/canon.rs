//! Canonical byte encodings: what is signed, hashed and bound into HPKE.
//!
//! Every encoding starts with a domain label and writes each variable-length field with an
//! 8-byte big-endian length before it, so two different field lists can never produce the
//! same bytes (no "RW2" ‖ "1" versus "RW" ‖ "21"), and bytes signed for one purpose (a
//! registry, a frame, a statement) can never be read as another.

/// Builder for one canonical encoding.
pub(crate) struct Canon(Vec<u8>);

impl Canon {
    /// Start an encoding under `label`, e.g. `"phm-registry/v1"`.
    pub(crate) fn new(label: &str) -> Canon {
        let mut c = Canon(Vec::with_capacity(256));
        c.bytes(label.as_bytes());
        c
    }

    /// A variable-length field, length first.
    pub(crate) fn bytes(&mut self, b: &[u8]) -> &mut Canon {
        // usize fits in u64 on every platform Rust supports.
        self.0.extend_from_slice(&(b.len() as u64).to_be_bytes());
        self.0.extend_from_slice(b);
        self
    }

    /// A field whose length the format fixes (a digest, a key): no prefix needed.
    pub(crate) fn fixed(&mut self, b: &[u8; 32]) -> &mut Canon {
        self.0.extend_from_slice(b);
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Canon {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Canon {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }

    pub(crate) fn bool(&mut self, v: bool) -> &mut Canon {
        self.0.push(u8::from(v));
        self
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// Length of `Canon::bytes(b)` for a field of `len` bytes, for size checks made before
/// anything is encoded.
pub(crate) const fn field_len(len: usize) -> usize {
    len.saturating_add(8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_prefixes_keep_field_boundaries() {
        let mut a = Canon::new("t");
        a.bytes(b"RW2").bytes(b"1");
        let mut b = Canon::new("t");
        b.bytes(b"RW").bytes(b"21");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn labels_separate_domains() {
        let mut a = Canon::new("phm-link/v1");
        a.bytes(b"x");
        let mut b = Canon::new("phm-secagg/v1");
        b.bytes(b"x");
        assert_ne!(a.finish(), b.finish());
    }

    #[test]
    fn field_len_matches_the_encoding() {
        let mut c = Canon::new("");
        let before = c.0.len();
        c.bytes(&[0; 5]);
        assert_eq!(c.0.len() - before, field_len(5));
    }
}
