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
