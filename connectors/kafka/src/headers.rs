//! Header names on memOS records. Values are UTF-8.

/// The command id, the idempotency key (UUID).
pub const COMMAND_ID: &str = "memos-command-id";
/// Who issued the command.
pub const ACTOR: &str = "memos-actor";
/// Avro full name of the value's schema.
pub const SCHEMA: &str = "memos-schema";
/// W3C trace context.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Dead-letter headers: where the record came from and why it could not be applied.
pub const DLQ_ORIGIN_TOPIC: &str = "memos-dlq-origin-topic";
pub const DLQ_ORIGIN_PARTITION: &str = "memos-dlq-origin-partition";
pub const DLQ_ORIGIN_OFFSET: &str = "memos-dlq-origin-offset";
pub const DLQ_ERROR_CLASS: &str = "memos-dlq-error-class";
pub const DLQ_ERROR_MESSAGE: &str = "memos-dlq-error-message";
/// When the record was dead-lettered, RFC 3339.
pub const DLQ_TIME: &str = "memos-dlq-time";
/// How a dead letter holds the original: `copy` (key and value are the original's; also
/// when absent) or `reference` (null key and value; the original stays at its origin).
pub const DLQ_FORM: &str = "memos-dlq-form";
/// On a reference: the original value's size in bytes and lower-case hex SHA-256 (absent
/// when the original value is null), and the same for its key.
pub const DLQ_ORIGIN_SIZE: &str = "memos-dlq-origin-size";
pub const DLQ_ORIGIN_SHA256: &str = "memos-dlq-origin-sha256";
pub const DLQ_ORIGIN_KEY_SIZE: &str = "memos-dlq-origin-key-size";
pub const DLQ_ORIGIN_KEY_SHA256: &str = "memos-dlq-origin-key-sha256";
