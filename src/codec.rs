//! The protobuf codec for the Coordinator service.
//!
//! It is prost's codec with one change: a request that does not decode (bad
//! wire format, a `string` field that is not UTF-8) is the caller's fault, so it
//! is answered with `INVALID_ARGUMENT` and prost's message, which names the
//! message and field, instead of the stock `INTERNAL`.

use std::marker::PhantomData;

use prost::Message;
use tonic::codec::{Codec as TonicCodec, DecodeBuf, Decoder as TonicDecoder};
use tonic::Status;
use tonic_prost::ProstEncoder;

/// A [`tonic::codec::Codec`] for prost messages that maps decode errors to
/// `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Codec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> TonicCodec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder { _pd: PhantomData }
    }
}

/// Decodes `U`, answering malformed input with `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct Decoder<U> {
    _pd: PhantomData<U>,
}

impl<U> Default for Decoder<U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<U: Message + Default> TonicDecoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(malformed)
    }
}

/// The status of a request that does not decode: `INVALID_ARGUMENT`, with
/// prost's message, which names the message and field.
pub fn malformed(e: prost::DecodeError) -> Status {
    Status::invalid_argument(format!("malformed request: {e}"))
}
