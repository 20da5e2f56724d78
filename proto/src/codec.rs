//! The gRPC codec of every phm.v1 service: prost encoding, but a message that does not
//! decode is refused as `INVALID_QUERY` with a sentence, not reported as INTERNAL.
//!
//! tonic's stock `ProstCodec` follows the gRPC guide and maps decode failures
//! (malformed bytes, nesting past prost's recursion limit) to INTERNAL, which tells an
//! operator the node is broken when it is the caller's input that is bad.

use crate::denial::{Denial, DenialReason};
use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic_prost::ProstEncoder;

/// Codec named by the generated services (`codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct PhmCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for PhmCodec<T, U> {
    fn default() -> Self {
        PhmCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for PhmCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = PhmDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        PhmDecoder { _pd: PhantomData }
    }
}

/// Decodes `U` with prost; a failure becomes an `INVALID_QUERY` denial.
#[derive(Debug, Clone)]
pub struct PhmDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for PhmDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf)
            .map(Some)
            .map_err(|e| decode_refusal(&e).to_status())
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}

fn decode_refusal(e: &prost::DecodeError) -> Denial {
    Denial::new(
        DenialReason::InvalidQuery,
        format!(
            "the message is not a valid phm.v1 protobuf message ({e}); \
             check the client speaks phm.v1 and that filters nest at most {} deep",
            crate::query::MAX_PREDICATE_DEPTH
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_are_invalid_query_with_a_sentence() {
        let err = crate::proto::AggregateQuery::decode(&[0xff_u8, 0xff, 0xff][..])
            .expect_err("garbage must not decode");
        let status = decode_refusal(&err).to_status();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let d = Denial::from_status(&status);
        assert_eq!(d.reason_name(), "INVALID_QUERY");
        assert!(
            d.message.contains("not a valid phm.v1 protobuf"),
            "{}",
            d.message
        );
    }
}
