//! An embedded database's handle that is dropped after an I/O error and
//! opened again on the next call (sled and redb both refuse every later
//! operation after their first I/O error, a full disk say), so the
//! controller recovers by itself once the cause is gone; and that refuses
//! every call once closed.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use super::StoreError;

#[derive(Debug)]
pub(crate) struct Reopening<T> {
    inner: RwLock<Option<Arc<T>>>,
    closed: AtomicBool,
}

impl<T> Reopening<T> {
    pub(crate) fn new(first: T) -> Self {
        Reopening {
            inner: RwLock::new(Some(Arc::new(first))),
            closed: AtomicBool::new(false),
        }
    }

    /// The open handle, or a new one from `open` when the last was
    /// dropped; an error once closed.
    pub(crate) fn get(
        &self,
        path: &Path,
        open: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<Arc<T>, StoreError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StoreError::Backend("the store is closed".into()));
        }
        if let Some(h) = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return Ok(h.clone());
        }
        let mut w = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = w.as_ref() {
            return Ok(h.clone());
        }
        let h = Arc::new(open()?);
        tracing::warn!(path = %path.display(), "database reopened after an I/O error");
        *w = Some(h.clone());
        Ok(h)
    }

    /// Drops the handle (after an I/O error): the next `get` reopens.
    pub(crate) fn drop_handle(&self) {
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Drops the handle for good: every later `get` fails.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.drop_handle();
    }
}
