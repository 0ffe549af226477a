//! What a PostgreSQL failure means for a worker: wait and retry, or isolate the record that
//! caused it.
//!
//! Guarantee: only failures that a value being written can cause are [`Failure::Record`]:
//! SQLSTATE class 22 (data exception: a time out of range, NUL in text or jsonb, a bad
//! number), class 23 (integrity constraint violation) and class 54 (program limit exceeded:
//! an index row too large, a JSON value too deep), plus sqlx's own refusal to encode a value.
//! Everything else, known or not (connection lost, pool timeout, I/O, serialization failure
//! 40001, deadlock 40P01, admin shutdown 57P*, cannot connect 08*, out of resources 53*, a
//! query canceled, a bug in a statement), is [`Failure::Transient`]: a worker that retries
//! such a failure with backoff never skips a record because of it.

use std::borrow::Cow;

/// How a worker must treat a failed transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing about the records: pause, back off, retry the same records, skip none.
    Transient,
    /// PostgreSQL refuses a value of the batch: applying it again fails again, so the record
    /// that carries it must be isolated.
    Record,
}

/// SQLSTATE classes (first two characters) whose errors are caused by the values written.
const RECORD_CLASSES: &[&str] = &["22", "23", "54"];

/// Classifies `error` (see the module documentation).
pub fn classify(error: &sqlx::Error) -> Failure {
    match error {
        sqlx::Error::Encode(_) => Failure::Record,
        sqlx::Error::Database(db) => match db.code() {
            Some(code) if RECORD_CLASSES.iter().any(|class| code.starts_with(class)) => Failure::Record,
            _ => Failure::Transient,
        },
        _ => Failure::Transient,
    }
}

/// The SQLSTATE of a database error, if it is one.
pub fn sqlstate(error: &sqlx::Error) -> Option<Cow<'_, str>> {
    error.as_database_error().and_then(|db| db.code())
}

/// The database's reason, as a dead letter records it: `SQLSTATE 22P05: unsupported Unicode
/// escape sequence (DETAIL ...)`, or sqlx's message for an encoding refusal.
pub fn reason(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or(Cow::Borrowed("?????"));
            let detail = db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .and_then(|pg| pg.detail())
                .map(|d| format!(" ({d})"))
                .unwrap_or_default();
            format!("SQLSTATE {code}: {}{detail}", db.message())
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_value_errors_are_record_failures() {
        let encode = sqlx::Error::Encode("DateTime out of range for Postgres".into());
        assert_eq!(classify(&encode), Failure::Record);
        for transient in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::WorkerCrashed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset)),
            sqlx::Error::Protocol("the active view schema changed".into()),
            sqlx::Error::RowNotFound,
        ] {
            assert_eq!(classify(&transient), Failure::Transient, "{transient}");
        }
    }
}
