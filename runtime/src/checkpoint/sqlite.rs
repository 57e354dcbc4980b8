//! SQLite checkpointer (placeholder while the backend is written).

use crate::error::Result;

/// SQLite store.
pub struct SqliteCheckpointer;

impl SqliteCheckpointer {
    /// Opens.
    pub async fn open(_url: &str) -> Result<Self> {
        Ok(SqliteCheckpointer)
    }
}
