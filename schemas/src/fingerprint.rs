//! CRC-64-AVRO ("Rabin") fingerprints, written from the Avro specification's reference code
//! so that the framing does not depend on a library's choice of byte order.

/// The spec's `EMPTY` constant: the fingerprint of the empty input.
const EMPTY: u64 = 0xc15d_213a_a4d7_a795;

const fn table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut i = 0;
    while i < 256 {
        let mut fp = i as u64;
        let mut j = 0;
        while j < 8 {
            fp = (fp >> 1) ^ (EMPTY & (0u64.wrapping_sub(fp & 1)));
            j += 1;
        }
        table[i] = fp;
        i += 1;
    }
    table
}

static TABLE: [u64; 256] = table();

/// The CRC-64-AVRO fingerprint of `bytes` (normally a schema's Parsing Canonical Form).
pub fn crc64_avro(bytes: &[u8]) -> u64 {
    bytes.iter().fold(EMPTY, |fp, &b| {
        (fp >> 8) ^ TABLE[((fp ^ u64::from(b)) & 0xff) as usize]
    })
}

/// The fingerprint of a parsed schema: CRC-64-AVRO of its Parsing Canonical Form.
pub fn schema_fingerprint(schema: &apache_avro::Schema) -> u64 {
    crc64_avro(schema.canonical_form().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from the Avro project's `share/test/data/schema-tests.txt`, published as
    /// signed 64-bit integers.
    #[test]
    fn matches_the_avro_spec_test_vectors() {
        let vectors: &[(&str, i64)] = &[
            (r#""null""#, 7195948357588979594),
            (r#""boolean""#, -6970731678124411036),
            (r#""int""#, 8247732601305521295),
            (r#""string""#, -8142146995180207161),
            (r#"{"name":"foo","type":"fixed","size":15}"#, 1756455273707447556),
            (
                r#"{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}"#,
                7843277075252814651,
            ),
        ];
        for (canonical, expected) in vectors {
            assert_eq!(crc64_avro(canonical.as_bytes()) as i64, *expected, "{canonical}");
        }
    }

    #[test]
    fn agrees_with_apache_avro_rabin_bytes() {
        use apache_avro::rabin::Rabin;
        let schema = apache_avro::Schema::parse_str(
            r#"{"type":"record","name":"foo","fields":[{"name":"f1","type":"boolean"}]}"#,
        )
        .unwrap();
        let theirs = schema.fingerprint::<Rabin>().bytes;
        assert_eq!(theirs, schema_fingerprint(&schema).to_le_bytes().to_vec());
    }
}
