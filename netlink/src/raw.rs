// SPDX-License-Identifier: Apache-2.0
//! A message whose body the caller builds and reads itself, for protocols
//! no maintained crate types (nf_tables).

use netlink_packet_core::{NetlinkDeserializable, NetlinkHeader, NetlinkSerializable};

/// A message type and the bytes after the netlink header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    pub message_type: u16,
    pub body: Vec<u8>,
}

impl NetlinkSerializable for RawMessage {
    fn message_type(&self) -> u16 {
        self.message_type
    }

    fn buffer_len(&self) -> usize {
        self.body.len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        buffer.copy_from_slice(&self.body);
    }
}

impl NetlinkDeserializable for RawMessage {
    type Error = std::convert::Infallible;

    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Self, Self::Error> {
        Ok(Self {
            message_type: header.message_type,
            body: payload.to_vec(),
        })
    }
}
