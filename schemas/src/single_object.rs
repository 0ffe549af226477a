//! Avro single-object encoding: `C3 01`, the writer schema's CRC-64-AVRO fingerprint as 8
//! little-endian bytes, then the Avro binary body. A reader needs no registry call to know
//! exactly which schema wrote a record.

/// The two marker bytes that open every single-object encoded record.
pub const MAGIC: [u8; 2] = [0xC3, 0x01];
/// Length of the header: marker plus fingerprint.
pub const HEADER_LEN: usize = 10;

/// Why bytes are not a single-object encoded record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FramingError {
    #[error("record is {0} bytes, shorter than the 10-byte single-object header")]
    TooShort(usize),
    #[error("record does not start with the single-object marker C3 01")]
    BadMagic,
}

/// Frames `body` (Avro binary written with the schema of `fingerprint`).
pub fn encode(fingerprint: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Splits a framed record into the writer fingerprint and the Avro body.
pub fn decode(bytes: &[u8]) -> Result<(u64, &[u8]), FramingError> {
    if bytes.len() < HEADER_LEN {
        return Err(FramingError::TooShort(bytes.len()));
    }
    if bytes[..2] != MAGIC {
        return Err(FramingError::BadMagic);
    }
    let fingerprint = u64::from_le_bytes(bytes[2..HEADER_LEN].try_into().expect("8 bytes"));
    Ok((fingerprint, &bytes[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_magic_then_little_endian_fingerprint() {
        let framed = encode(0x0102_0304_0506_0708, b"body");
        assert_eq!(
            framed,
            [
                0xC3, 0x01, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, b'b', b'o', b'd', b'y'
            ]
        );
        assert_eq!(decode(&framed), Ok((0x0102_0304_0506_0708, &b"body"[..])));
    }

    #[test]
    fn rejects_short_and_unmarked_input() {
        assert_eq!(decode(b"\xC3\x01abc"), Err(FramingError::TooShort(5)));
        assert_eq!(decode(b"{\"json\": \"no\"}"), Err(FramingError::BadMagic));
    }
}
