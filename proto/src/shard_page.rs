//! A fetch page encoded straight from where its records lie: borrowed twins
//! of [`StoredRecord`] and of `Response { id, body: ResponseBody::Records
//! { records, more } }` that encode to exactly the bytes of the owned types,
//! so a shard answers a `Fetch` without copying each payload into a `Vec`
//! first. The tests pin the byte equality.
//!
//! [`StoredRecord`]: crate::shard::StoredRecord

use serde::{
    ser::{SerializeStruct, SerializeStructVariant},
    Serialize, Serializer,
};

/// Index of `Records` among the variants of [`crate::shard::ResponseBody`].
const RECORDS_VARIANT_INDEX: u32 = 2;

/// Borrowed twin of [`crate::shard::StoredRecord`]: same fields, same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoredRecordRef<'a> {
    pub seq: u64,
    pub msg_id: u128,
    pub timestamp_ms: u64,
    #[serde(with = "serde_bytes")]
    pub payload: &'a [u8],
}

impl StoredRecordRef<'_> {
    /// The owned record.
    pub fn to_record(&self) -> crate::shard::StoredRecord {
        crate::shard::StoredRecord {
            seq: self.seq,
            msg_id: self.msg_id,
            timestamp_ms: self.timestamp_ms,
            payload: self.payload.to_vec(),
        }
    }
}

/// Borrowed twin of a `Records` response; encode it with
/// [`crate::frame::encode`].
#[derive(Debug, Clone, Copy)]
pub struct RecordsResponseRef<'r, 'a> {
    pub id: u64,
    pub records: &'r [StoredRecordRef<'a>],
    pub more: bool,
}

impl Serialize for RecordsResponseRef<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut response = s.serialize_struct("Response", 2)?;
        response.serialize_field("id", &self.id)?;
        response.serialize_field("body", &RecordsBody(self))?;
        response.end()
    }
}

/// The `ResponseBody::Records` part of a [`RecordsResponseRef`].
struct RecordsBody<'x, 'r, 'a>(&'x RecordsResponseRef<'r, 'a>);

impl Serialize for RecordsBody<'_, '_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut body =
            s.serialize_struct_variant("ResponseBody", RECORDS_VARIANT_INDEX, "Records", 2)?;
        body.serialize_field("records", self.0.records)?;
        body.serialize_field("more", &self.0.more)?;
        body.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        frame,
        shard::{Response, ResponseBody},
    };
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn encodes_exactly_like_the_owned_response(
            id in any::<u64>(),
            more in any::<bool>(),
            records in proptest::collection::vec(
                (any::<u64>(), any::<u128>(), any::<u64>(),
                 proptest::collection::vec(any::<u8>(), 0..300)),
                0..20,
            ),
        ) {
            let refs: Vec<StoredRecordRef<'_>> = records
                .iter()
                .map(|(seq, msg_id, timestamp_ms, payload)| StoredRecordRef {
                    seq: *seq,
                    msg_id: *msg_id,
                    timestamp_ms: *timestamp_ms,
                    payload,
                })
                .collect();
            let twin = RecordsResponseRef { id, records: &refs, more };
            let response = Response {
                id,
                body: ResponseBody::Records {
                    records: refs.iter().map(StoredRecordRef::to_record).collect(),
                    more,
                },
            };
            let (mut a, mut b) = (Vec::new(), Vec::new());
            frame::encode(&twin, usize::MAX, &mut a).unwrap();
            frame::encode(&response, usize::MAX, &mut b).unwrap();
            prop_assert_eq!(&a, &b);
            // And it decodes as the owned response.
            let mut buf = bytes::BytesMut::from(&a[..]);
            match frame::decode::<Response>(&mut buf, usize::MAX).unwrap() {
                frame::Decoded::Frame(decoded) => prop_assert_eq!(decoded, response),
                frame::Decoded::Incomplete => prop_assert!(false, "incomplete"),
            }
        }
    }
}
