//! PostgreSQL checkpointer (placeholder while the backend is written).

use crate::error::Result;

/// PostgreSQL store.
pub struct PostgresCheckpointer;

impl PostgresCheckpointer {
    /// Connects.
    pub async fn connect(_url: &str) -> Result<Self> {
        Ok(PostgresCheckpointer)
    }
}
