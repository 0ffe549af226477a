//! Schema fingerprints exactly as the Avro specification defines them: CRC-64-AVRO ("Rabin")
//! of the schema's Parsing Canonical Form.
//!
//! Guarantee: [`fingerprint`] and [`schema_fingerprint`] give, for every valid schema, the
//! value any spec-following Avro implementation computes (Java's
//! `SchemaNormalization.parsingFingerprint64`, fastavro's `fingerprint(.., "CRC-64-AVRO")`),
//! so a record framed by any Avro client names a schema memOS knows. The cross-implementation
//! test (`schemas/tests/cross_implementations.rs`) checks every schema in `schemas/avro/`
//! against both.
//!
//! The Parsing Canonical Form is written here by hand, from the schema's JSON, rather than
//! taken from `apache_avro::Schema::canonical_form()`: apache-avro 0.22 keeps
//! `{"type":"long"}` for a type with a `logicalType` where the spec strips it to `"long"`, so
//! every memOS schema (each has a `timestamp-millis` field) got a fingerprint no other client
//! computes. The fingerprints memOS wrote with that form are kept in
//! [`crate::registry::LEGACY_FINGERPRINTS`] so records already on the topics stay readable.
//! The CRC itself follows the spec's reference code, so the framing does not depend on a
//! library's choice of byte order.

use std::collections::HashSet;

use serde_json::{Map, Value};

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

/// The fingerprint of a schema given as JSON text (an `.avsc` file's content).
pub fn fingerprint(schema_json: &str) -> Result<u64, InvalidSchema> {
    let value: Value =
        serde_json::from_str(schema_json).map_err(|e| InvalidSchema(format!("not JSON: {e}")))?;
    Ok(crc64_avro(parsing_canonical_form(&value)?.as_bytes()))
}

/// The fingerprint of a schema apache-avro has parsed, for callers that hold one. Computed
/// from the parsed tree (whose names are already full), not from apache-avro's JSON of it,
/// which drops an explicit empty namespace on a nested type; [`fingerprint`] of the schema's
/// JSON text gives the same value (tested on every vector and every released schema).
pub fn schema_fingerprint(schema: &apache_avro::Schema) -> u64 {
    let mut out = String::new();
    write_parsed(schema, &mut HashSet::new(), &mut out);
    crc64_avro(out.as_bytes())
}

/// The Parsing Canonical Form of a parsed schema: logical types are written as their
/// underlying type, named types in full where first met and by full name after.
fn write_parsed(schema: &apache_avro::Schema, defined: &mut HashSet<String>, out: &mut String) {
    use apache_avro::Schema as S;
    use apache_avro::schema::{InnerDecimalSchema, UuidSchema};
    let primitive = match schema {
        S::Null => "null",
        S::Boolean => "boolean",
        S::Int | S::Date | S::TimeMillis => "int",
        S::Long
        | S::TimeMicros
        | S::TimestampMillis
        | S::TimestampMicros
        | S::TimestampNanos
        | S::LocalTimestampMillis
        | S::LocalTimestampMicros
        | S::LocalTimestampNanos => "long",
        S::Float => "float",
        S::Double => "double",
        S::Bytes
        | S::BigDecimal
        | S::Decimal(apache_avro::schema::DecimalSchema {
            inner: InnerDecimalSchema::Bytes,
            ..
        })
        | S::Uuid(UuidSchema::Bytes) => "bytes",
        S::String | S::Uuid(UuidSchema::String) => "string",
        S::Array(array) => {
            out.push_str(r#"{"type":"array","items":"#);
            write_parsed(&array.items, defined, out);
            out.push('}');
            return;
        }
        S::Map(map) => {
            out.push_str(r#"{"type":"map","values":"#);
            write_parsed(&map.types, defined, out);
            out.push('}');
            return;
        }
        S::Union(union) => {
            out.push('[');
            for (i, branch) in union.variants().iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_parsed(branch, defined, out);
            }
            out.push(']');
            return;
        }
        S::Ref { name } => {
            write_string(&name.fullname(None), out);
            return;
        }
        S::Record(record) => {
            if write_name(&record.name.fullname(None), "record", defined, out) {
                out.push_str(r#","fields":["#);
                for (i, field) in record.fields.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(r#"{"name":"#);
                    write_string(&field.name, out);
                    out.push_str(r#","type":"#);
                    write_parsed(&field.schema, defined, out);
                    out.push('}');
                }
                out.push_str("]}");
            }
            return;
        }
        S::Enum(enumeration) => {
            if write_name(&enumeration.name.fullname(None), "enum", defined, out) {
                out.push_str(r#","symbols":["#);
                for (i, symbol) in enumeration.symbols.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(symbol, out);
                }
                out.push_str("]}");
            }
            return;
        }
        S::Fixed(fixed)
        | S::Duration(fixed)
        | S::Uuid(UuidSchema::Fixed(fixed))
        | S::Decimal(apache_avro::schema::DecimalSchema {
            inner: InnerDecimalSchema::Fixed(fixed),
            ..
        }) => {
            if write_name(&fixed.name.fullname(None), "fixed", defined, out) {
                out.push_str(&format!(r#","size":{}}}"#, fixed.size));
            }
            return;
        }
    };
    write_string(primitive, out);
}

/// Opens a named type's definition (`{"name":..,"type":..`) and answers true, or, when it
/// was defined before, writes only its quoted full name and answers false.
fn write_name(fullname: &str, kind: &str, defined: &mut HashSet<String>, out: &mut String) -> bool {
    if !defined.insert(fullname.to_owned()) {
        write_string(fullname, out);
        return false;
    }
    out.push_str(r#"{"name":"#);
    write_string(fullname, out);
    out.push_str(r#","type":"#);
    write_string(kind, out);
    true
}

/// Why a JSON value is not an Avro schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Avro schema: {0}")]
pub struct InvalidSchema(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, InvalidSchema> {
    Err(InvalidSchema(message.into()))
}

const PRIMITIVES: [&str; 8] = [
    "null", "boolean", "int", "long", "float", "double", "bytes", "string",
];

/// The Parsing Canonical Form of `schema`, transformed by the spec's rules in order:
///
/// - PRIMITIVES: `{"type":"int"}` becomes `"int"` (so a logical type, once STRIP drops
///   `logicalType`, leaves its underlying type: `{"type":"long","logicalType":..}` is
///   `"long"`; a `fixed` with a logical type stays a `fixed`).
/// - FULLNAMES: every named type (record, enum, fixed) is written with its full name, its
///   namespace being its own, or else that of the most tightly enclosing named type; every
///   reference to a defined named type is replaced by the quoted full name, and a named type
///   is written out in full only where it is first defined.
/// - STRIP: only `type`, `name`, `fields`, `symbols`, `items`, `values` and `size` are kept
///   (so `namespace`, `doc`, `aliases`, `default`, `order`, `logicalType`, ... go).
/// - ORDER: attributes in the order `name`, `type`, `fields`, `symbols`, `items`, `values`,
///   `size`.
/// - STRINGS: strings written with their UTF-8 characters, not escapes.
/// - INTEGERS: no leading zeros.
/// - WHITESPACE: none outside strings.
pub fn parsing_canonical_form(schema: &Value) -> Result<String, InvalidSchema> {
    let mut out = String::new();
    Canonicalizer::default().write(schema, None, &mut out)?;
    Ok(out)
}

#[derive(Default)]
struct Canonicalizer {
    /// Full names of the named types defined so far, in document order.
    defined: HashSet<String>,
}

impl Canonicalizer {
    fn write(
        &mut self,
        schema: &Value,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), InvalidSchema> {
        match schema {
            Value::String(name) => self.write_reference(name, namespace, out),
            Value::Array(branches) => {
                out.push('[');
                for (i, branch) in branches.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    self.write(branch, namespace, out)?;
                }
                out.push(']');
                Ok(())
            }
            Value::Object(attributes) => self.write_object(attributes, namespace, out),
            other => invalid(format!(
                "a schema is a string, an array or an object, not {other}"
            )),
        }
    }

    fn write_object(
        &mut self,
        attributes: &Map<String, Value>,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), InvalidSchema> {
        let Some(Value::String(type_name)) = attributes.get("type") else {
            return invalid("a schema object needs a \"type\" that names a type");
        };
        match type_name.as_str() {
            primitive if PRIMITIVES.contains(&primitive) => {
                write_string(primitive, out);
                Ok(())
            }
            "array" => {
                out.push_str(r#"{"type":"array","items":"#);
                self.write(required(attributes, "items")?, namespace, out)?;
                out.push('}');
                Ok(())
            }
            "map" => {
                out.push_str(r#"{"type":"map","values":"#);
                self.write(required(attributes, "values")?, namespace, out)?;
                out.push('}');
                Ok(())
            }
            // `error` is a record that a protocol may throw; Java reads it as a record.
            "record" | "error" => self.write_named(Named::Record, attributes, namespace, out),
            "enum" => self.write_named(Named::Enum, attributes, namespace, out),
            "fixed" => self.write_named(Named::Fixed, attributes, namespace, out),
            // `{"type":"Name"}` refers to a named type defined earlier, as Java accepts.
            name => self.write_reference(name, namespace, out),
        }
    }

    /// A type named by a string: a primitive, or a named type defined earlier.
    fn write_reference(
        &mut self,
        name: &str,
        namespace: Option<&str>,
        out: &mut String,
    ) -> Result<(), InvalidSchema> {
        if PRIMITIVES.contains(&name) {
            write_string(name, out);
            return Ok(());
        }
        // A dotted name is already full; a short one is in the enclosing namespace. So a type
        // of the null namespace cannot be named from inside another namespace: Java Avro 1.12
        // and fastavro refuse that too.
        let fullname = match namespace {
            Some(ns) if !name.contains('.') => format!("{ns}.{name}"),
            _ => name.to_owned(),
        };
        if !self.defined.contains(&fullname) {
            return invalid(format!("unknown type {fullname:?}"));
        }
        write_string(&fullname, out);
        Ok(())
    }

    fn write_named(
        &mut self,
        kind: Named,
        attributes: &Map<String, Value>,
        enclosing: Option<&str>,
        out: &mut String,
    ) -> Result<(), InvalidSchema> {
        let Value::String(name) = required(attributes, "name")? else {
            return invalid("a name is a string");
        };
        let fullname = full_name(name, attributes.get("namespace"), enclosing)?;
        if !self.defined.insert(fullname.clone()) {
            return invalid(format!("{fullname} is defined twice"));
        }
        // Types nested in this one inherit its namespace.
        let namespace = fullname.rsplit_once('.').map(|(ns, _)| ns.to_owned());
        out.push_str(r#"{"name":"#);
        write_string(&fullname, out);
        out.push_str(r#","type":"#);
        match kind {
            Named::Record => {
                out.push_str(r#""record","fields":["#);
                let Value::Array(fields) = required(attributes, "fields")? else {
                    return invalid(format!("{fullname}: fields is an array"));
                };
                for (i, field) in fields.iter().enumerate() {
                    let Value::Object(field) = field else {
                        return invalid(format!("{fullname}: a field is an object"));
                    };
                    let Value::String(field_name) = required(field, "name")? else {
                        return invalid(format!("{fullname}: a field name is a string"));
                    };
                    check_name(field_name)?;
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(r#"{"name":"#);
                    write_string(field_name, out);
                    out.push_str(r#","type":"#);
                    self.write(required(field, "type")?, namespace.as_deref(), out)?;
                    out.push('}');
                }
                out.push_str("]}");
            }
            Named::Enum => {
                out.push_str(r#""enum","symbols":["#);
                let Value::Array(symbols) = required(attributes, "symbols")? else {
                    return invalid(format!("{fullname}: symbols is an array"));
                };
                for (i, symbol) in symbols.iter().enumerate() {
                    let Value::String(symbol) = symbol else {
                        return invalid(format!("{fullname}: a symbol is a string"));
                    };
                    check_name(symbol)?;
                    if i > 0 {
                        out.push(',');
                    }
                    write_string(symbol, out);
                }
                out.push_str("]}");
            }
            Named::Fixed => {
                // INTEGERS: written from the number's value, never from its source text.
                let Some(size) = required(attributes, "size")?.as_u64() else {
                    return invalid(format!("{fullname}: size is a non-negative integer"));
                };
                out.push_str(r#""fixed","size":"#);
                out.push_str(&size.to_string());
                out.push('}');
            }
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum Named {
    Record,
    Enum,
    Fixed,
}

fn required<'a>(attributes: &'a Map<String, Value>, key: &str) -> Result<&'a Value, InvalidSchema> {
    attributes
        .get(key)
        .ok_or_else(|| InvalidSchema(format!("missing {key:?}")))
}

/// The full name of a named type: a dotted name is full already; otherwise its own
/// `namespace` (an empty one is the null namespace), or else the enclosing one.
fn full_name(name: &str, own: Option<&Value>, enclosing: Option<&str>) -> Result<String, InvalidSchema> {
    let namespace = match own {
        _ if name.contains('.') => None,
        Some(Value::String(ns)) => Some(ns.as_str()),
        Some(Value::Null) | None => enclosing,
        Some(other) => return invalid(format!("a namespace is a string, not {other}")),
    };
    let fullname = match namespace {
        Some(ns) if !ns.is_empty() => format!("{ns}.{name}"),
        _ => name.to_owned(),
    };
    for part in fullname.split('.') {
        check_name(part)?;
    }
    Ok(fullname)
}

/// Names, namespace parts and enum symbols match `[A-Za-z_][A-Za-z0-9_]*` (spec, "Names").
/// Besides refusing what no implementation accepts, this makes the STRINGS rule exact: such
/// a string needs no escape in any implementation's output.
fn check_name(name: &str) -> Result<(), InvalidSchema> {
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        invalid(format!("{name:?} is not a valid Avro name"))
    }
}

/// STRINGS: serde_json escapes only `"`, `\` and control characters and writes every other
/// character as UTF-8, which is what the spec asks for.
fn write_string(s: &str, out: &mut String) {
    out.push_str(&serde_json::to_string(s).expect("a string serializes"));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from the Avro project's `share/test/data/schema-tests.txt`, published as
    /// signed 64-bit integers.
    #[test]
    fn crc_matches_the_avro_spec_test_vectors() {
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
    fn crc_agrees_with_apache_avro_rabin_bytes() {
        use apache_avro::rabin::Rabin;
        let schema = apache_avro::Schema::parse_str(
            r#"{"type":"record","name":"foo","fields":[{"name":"f1","type":"boolean"}]}"#,
        )
        .unwrap();
        let theirs = schema.fingerprint::<Rabin>().bytes;
        assert_eq!(theirs, schema_fingerprint(&schema).to_le_bytes().to_vec());
    }

    /// Schemas, their Parsing Canonical Form and fingerprint. The expected strings and
    /// fingerprints were computed by two independent implementations, which agree on each:
    /// fastavro 1.13.1 (`to_parsing_canonical_form`, `fingerprint(.., "CRC-64-AVRO")`) and
    /// Java Avro 1.12.2 (`SchemaNormalization.toParsingForm`, `parsingFingerprint64`).
    const VECTORS: &[(&str, &str, &str, u64)] = &[
        (
            "logical types",
            concat!(
                r#"{"type":"record","name":"Logical","namespace":"v","fields":["#,
                r#"{"name":"at","type":{"type":"long","logicalType":"timestamp-millis"}},"#,
                r#"{"name":"micros","type":{"type":"long","logicalType":"timestamp-micros"}},"#,
                r#"{"name":"day","type":{"type":"int","logicalType":"date"}},"#,
                r#"{"name":"id","type":{"type":"string","logicalType":"uuid"}},"#,
                r#"{"name":"amount","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},"#,
                r#"{"name":"money","type":{"type":"fixed","name":"Money","size":8,"logicalType":"decimal","precision":18,"scale":4}},"#,
                r#"{"name":"maybe","type":["null",{"type":"long","logicalType":"timestamp-millis"}],"default":null}]}"#,
            ),
            r#"{"name":"v.Logical","type":"record","fields":[{"name":"at","type":"long"},{"name":"micros","type":"long"},{"name":"day","type":"int"},{"name":"id","type":"string"},{"name":"amount","type":"bytes"},{"name":"money","type":{"name":"v.Money","type":"fixed","size":8}},{"name":"maybe","type":["null","long"]}]}"#,
            0x4273_277d_503a_2592,
        ),
        (
            "nested records and namespaces",
            concat!(
                r#"{"type":"record","name":"Outer","namespace":"a.b","doc":"outer","aliases":["Old"],"fields":["#,
                r#"{"name":"inner","type":{"type":"record","name":"Inner","fields":[{"name":"x","type":"int","default":0}]}},"#,
                r#"{"name":"other","type":{"type":"record","name":"Elsewhere","namespace":"c","fields":["#,
                r#"{"name":"deep","type":{"type":"record","name":"Deep","fields":[{"name":"y","type":{"type":"string"}}]}}]}},"#,
                r#"{"name":"again","type":"Inner"},"#,
                r#"{"name":"full","type":"c.Deep"},"#,
                r#"{"name":"dotted","type":{"type":"record","name":"x.y.Dotted","namespace":"ignored","fields":[{"name":"z","type":"Dotted"}]}}]}"#,
            ),
            r#"{"name":"a.b.Outer","type":"record","fields":[{"name":"inner","type":{"name":"a.b.Inner","type":"record","fields":[{"name":"x","type":"int"}]}},{"name":"other","type":{"name":"c.Elsewhere","type":"record","fields":[{"name":"deep","type":{"name":"c.Deep","type":"record","fields":[{"name":"y","type":"string"}]}}]}},{"name":"again","type":"a.b.Inner"},{"name":"full","type":"c.Deep"},{"name":"dotted","type":{"name":"x.y.Dotted","type":"record","fields":[{"name":"z","type":"x.y.Dotted"}]}}]}"#,
            0xcd56_2644_8b8d_2a79,
        ),
        (
            "enum",
            r#"{"type":"enum","name":"Suit","namespace":"cards","doc":"d","aliases":["S"],"symbols":["SPADES","HEARTS","DIAMONDS","CLUBS"],"default":"SPADES"}"#,
            r#"{"name":"cards.Suit","type":"enum","symbols":["SPADES","HEARTS","DIAMONDS","CLUBS"]}"#,
            0xbcb5_1ba5_b16d_3489,
        ),
        (
            "arrays, maps, order",
            concat!(
                r#"{"type":"record","name":"Collections","fields":["#,
                r#"{"name":"list","type":{"type":"array","items":{"type":"map","values":{"type":"long","logicalType":"timestamp-millis"}}},"default":[]},"#,
                r#"{"name":"dict","type":{"type":"map","values":{"type":"array","items":"string"}},"default":{}},"#,
                r#"{"name":"kind","type":{"type":"enum","name":"Kind","symbols":["A","B"]},"order":"descending"},"#,
                r#"{"name":"kinds","type":{"type":"array","items":"Kind"}}]}"#,
            ),
            r#"{"name":"Collections","type":"record","fields":[{"name":"list","type":{"type":"array","items":{"type":"map","values":"long"}}},{"name":"dict","type":{"type":"map","values":{"type":"array","items":"string"}}},{"name":"kind","type":{"name":"Kind","type":"enum","symbols":["A","B"]}},{"name":"kinds","type":{"type":"array","items":"Kind"}}]}"#,
            0xbbdf_019d_d762_d6b5,
        ),
        (
            "unions",
            concat!(
                r#"{"type":"record","name":"Unions","namespace":"u","fields":["#,
                r#"{"name":"opt","type":["null","string"],"default":null},"#,
                r#"{"name":"many","type":[{"type":"int"},"double",{"type":"record","name":"R","fields":[{"name":"f","type":"boolean"}]},{"type":"array","items":"R"},{"type":"map","values":"bytes"}]}]}"#,
            ),
            r#"{"name":"u.Unions","type":"record","fields":[{"name":"opt","type":["null","string"]},{"name":"many","type":["int","double",{"name":"u.R","type":"record","fields":[{"name":"f","type":"boolean"}]},{"type":"array","items":"u.R"},{"type":"map","values":"bytes"}]}]}"#,
            0xc765_7b0a_3846_027e,
        ),
        (
            "fixed",
            r#"{"type":"fixed","name":"Hash","namespace":"h","size":32,"aliases":["Digest"],"doc":"sha-256"}"#,
            r#"{"name":"h.Hash","type":"fixed","size":32}"#,
            0xeda9_f759_3c62_e75f,
        ),
        (
            "defaults",
            concat!(
                r#"{"type":"record","name":"Defaults","namespace":"d","fields":["#,
                r#"{"name":"i","type":"int","default":7,"doc":"seven"},"#,
                r#"{"name":"s","type":"string","default":"x","aliases":["t"]},"#,
                r#"{"name":"r","type":{"type":"record","name":"Sub","fields":[{"name":"v","type":"double","default":0.5}]},"default":{"v":1.0}},"#,
                r#"{"name":"e","type":{"type":"enum","name":"E","symbols":["P","Q"],"default":"P"},"default":"Q"},"#,
                r#"{"name":"n","type":["null","long"],"default":null}]}"#,
            ),
            r#"{"name":"d.Defaults","type":"record","fields":[{"name":"i","type":"int"},{"name":"s","type":"string"},{"name":"r","type":{"name":"d.Sub","type":"record","fields":[{"name":"v","type":"double"}]}},{"name":"e","type":{"name":"d.E","type":"enum","symbols":["P","Q"]}},{"name":"n","type":["null","long"]}]}"#,
            0xd0f8_aca5_effe_232c,
        ),
        (
            "namespaces: own, empty, inherited, references",
            concat!(
                r#"{"type":"record","name":"Top","fields":["#,
                r#"{"name":"a","type":{"type":"record","name":"A","namespace":"one","fields":["#,
                r#"{"name":"b","type":{"type":"fixed","name":"B","size":2}},"#,
                r#"{"name":"c","type":{"type":"enum","name":"C","namespace":"","symbols":["X"]}},"#,
                r#"{"name":"b2","type":"B"},"#,
                r#"{"name":"b3","type":"one.B"},"#,
                r#"{"name":"a","type":["null","A"]}]}},"#,
                r#"{"name":"b","type":"one.B"},"#,
                r#"{"name":"c","type":"C"},"#,
                r#"{"name":"top","type":["null","Top"]}]}"#,
            ),
            r#"{"name":"Top","type":"record","fields":[{"name":"a","type":{"name":"one.A","type":"record","fields":[{"name":"b","type":{"name":"one.B","type":"fixed","size":2}},{"name":"c","type":{"name":"C","type":"enum","symbols":["X"]}},{"name":"b2","type":"one.B"},{"name":"b3","type":"one.B"},{"name":"a","type":["null","one.A"]}]}},{"name":"b","type":"one.B"},{"name":"c","type":"C"},{"name":"top","type":["null","Top"]}]}"#,
            0xe803_506a_3345_fa28,
        ),
        (
            "escaped strings",
            r#"{"type":"record","name":"\u0053trings","namespace":"s\u0074r","fields":[{"name":"\u0066ield","type":{"type":"enum","name":"Sym","symbols":["\u0041","B"]}}]}"#,
            r#"{"name":"str.Strings","type":"record","fields":[{"name":"field","type":{"name":"str.Sym","type":"enum","symbols":["A","B"]}}]}"#,
            0xafa5_c676_d8c9_8514,
        ),
        (
            "primitive in object form",
            r#"{"type":"long","logicalType":"timestamp-millis","doc":"d"}"#,
            r#""long""#,
            0xd054_e144_93f4_1db7,
        ),
        (
            "top-level map",
            r#"{"type":"map","values":{"type":"string","avro.java.string":"String"},"default":{}}"#,
            r#"{"type":"map","values":"string"}"#,
            0x86ce_965d_9286_4572,
        ),
    ];

    #[test]
    fn canonical_form_and_fingerprint_match_independent_implementations() {
        for (what, schema, canonical, expected) in VECTORS {
            let value: Value = serde_json::from_str(schema).unwrap();
            assert_eq!(parsing_canonical_form(&value).unwrap(), *canonical, "{what}");
            assert_eq!(
                fingerprint(schema).unwrap(),
                *expected,
                "{what}: {expected:#018x}"
            );
        }
    }

    /// The issue's example: apache-avro 0.22's `canonical_form()` keeps the logical type of
    /// `issued_at`, giving 0xcc5f21fc11eed860; fastavro and Java give 0x72aaf545c1741940.
    #[test]
    fn write_memory_v2_has_the_spec_fingerprint() {
        let json = include_str!("../avro/memory/WriteMemory.v2.avsc");
        assert_eq!(fingerprint(json).unwrap(), 0x72aa_f545_c174_1940);
        let parsed = apache_avro::Schema::parse_str(json).unwrap();
        assert_eq!(schema_fingerprint(&parsed), 0x72aa_f545_c174_1940);
    }

    /// The parsed-schema path (through apache-avro's JSON) and the JSON path agree on every
    /// vector and every released schema.
    #[test]
    fn parsed_and_json_paths_agree() {
        let released = crate::registry::RELEASED.iter().map(|r| r.json);
        for json in VECTORS.iter().map(|v| v.1).chain(released) {
            let parsed = apache_avro::Schema::parse_str(json).unwrap();
            assert_eq!(schema_fingerprint(&parsed), fingerprint(json).unwrap(), "{json}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_schema() {
        let cases = [
            ("42", "a schema is"),
            (r#"{"type":"record","fields":[]}"#, "missing \"name\""),
            (r#""Nowhere""#, "unknown type \"Nowhere\""),
            (r#"{"type":"fixed","name":"F","size":-1}"#, "size"),
            (
                r#"{"type":"enum","name":"E","symbols":["ok","not ok"]}"#,
                "not a valid Avro name",
            ),
            (
                r#"{"type":"record","name":"1x","fields":[]}"#,
                "not a valid Avro name",
            ),
            (
                r#"[{"type":"fixed","name":"F","size":1},{"type":"fixed","name":"F","size":2}]"#,
                "defined twice",
            ),
            // The null namespace's `C` cannot be named from namespace `n`.
            (
                r#"{"type":"record","name":"R","fields":[{"name":"c","type":{"type":"enum","name":"C","symbols":["X"]}},{"name":"s","type":{"type":"record","name":"S","namespace":"n","fields":[{"name":"c","type":"C"}]}}]}"#,
                "unknown type \"n.C\"",
            ),
        ];
        for (schema, expected) in cases {
            let value: Value = serde_json::from_str(schema).unwrap();
            let err = parsing_canonical_form(&value).unwrap_err();
            assert!(err.0.contains(expected), "{schema}: {err}");
        }
    }
}
