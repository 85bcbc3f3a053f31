//! The codec of every fleetcmd service and client: prost, as tonic's
//! default, with smaller per-stream buffers.
//!
//! tonic gives each call an encode and a decode buffer of 8 KiB up front.
//! An agent holds one stream open for its whole life and sends messages of a
//! few hundred bytes (heartbeats, results), so with 10 000 agents the
//! controller kept 160 MiB in buffers that were almost empty. They start at
//! 1 KiB here and grow when a larger message comes (a result with its output
//! is reserved at its full length from the gRPC length prefix); the
//! per-service message size limits are unchanged.

use std::marker::PhantomData;

use tonic::codec::{BufferSettings, Codec};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Initial capacity of a call's encode and decode buffer.
pub const BUFFER_BYTES: usize = 1024;
/// tonic's default: encoded stream messages are flushed to the transport
/// after this many bytes at most.
pub const YIELD_THRESHOLD: usize = 32 * 1024;

/// `tonic_prost::ProstCodec` with `BUFFER_BYTES` buffers (the generated code
/// uses it through `codec_path`).
#[derive(Debug, Clone, Copy)]
pub struct ProstCodec<T, U>(PhantomData<fn() -> (T, U)>);

impl<T, U> Default for ProstCodec<T, U> {
    fn default() -> Self {
        ProstCodec(PhantomData)
    }
}

fn settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD)
}

impl<T, U> Codec for ProstCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::new(settings())
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::new(settings())
    }
}
