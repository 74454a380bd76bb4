//! The gRPC codec of every Lifeboat service: prost messages, with the encode buffer sized
//! for the whole message before encoding.
//!
//! tonic encodes into a buffer that starts small and grows as prost writes into it; a change
//! batch of several MiB then grows it by doubling, copying what was already encoded each
//! time (about one extra copy of every payload byte, on every hop). Reserving the encoded
//! length first makes the encoding the only copy. Decoding is prost's, unchanged.
use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{Codec, EncodeBuf, Encoder};
use tonic::Status;
use tonic_prost::ProstDecoder;

/// Named by the generated clients and servers (`codec_path` in `build.rs`).
#[derive(Debug, Clone)]
pub struct LifeboatCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for LifeboatCodec<T, U> {
    fn default() -> Self {
        LifeboatCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for LifeboatCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        ProstDecoder::default()
    }
}

/// Encodes a prost message after reserving room for all of it.
#[derive(Debug, Clone)]
pub struct SizedEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding a message: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{ChangeBatch, Extent};
    use http_body_util::BodyExt;
    use tonic::codec::{EncodeBody, SingleMessageCompressionOverride};

    #[tokio::test]
    async fn a_batch_goes_out_as_prost_encodes_it() {
        let batch = ChangeBatch {
            disk_id: "d".into(),
            seq: 7,
            extents: vec![Extent {
                offset: 4096,
                data: vec![0xab; 3 << 20].into(),
                zero_length: 0,
            }],
            ..Default::default()
        };
        let encoder = LifeboatCodec::<ChangeBatch, ChangeBatch>::default().encoder();
        let source = tokio_stream::iter(vec![Ok(batch.clone())]);
        let body = EncodeBody::new_server(
            encoder,
            source,
            None,
            SingleMessageCompressionOverride::default(),
            None,
        );
        let sent = body.collect().await.unwrap().to_bytes();
        let plain = batch.encode_to_vec();
        assert_eq!(sent[0], 0, "not compressed");
        assert_eq!(&sent[1..5], (plain.len() as u32).to_be_bytes().as_slice());
        assert_eq!(&sent[5..], plain.as_slice());
        assert_eq!(ChangeBatch::decode(&sent[5..]).unwrap(), batch);
    }
}
