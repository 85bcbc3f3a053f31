//! The one mapping from controller errors to gRPC statuses. Handlers return
//! `ApiError`; nothing else builds a `tonic::Status` from a domain error.

use fleetcmd_core::authorize::Refusal;
use tonic::Status;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    /// The job's short id (its id's last 12 hex digits) names a stored job
    /// already: ABORTED, not ALREADY_EXISTS (a replayed id), because the
    /// submitter should sign the job again with a new id, and must not
    /// after a replay (the job may have been stored). The other job is not
    /// named: the submitter may not be allowed to read it.
    #[error(
        "job {job}: its short id {short} already names another job; submit it again with a new job id"
    )]
    ShortIdTaken { job: String, short: String },
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("job refused: {0}")]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        match e {
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::PermissionDenied(m) => Status::permission_denied(m),
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::AlreadyExists(m) => Status::already_exists(m),
            e @ ApiError::ShortIdTaken { .. } => Status::aborted(e.to_string()),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::ResourceExhausted(m) => Status::resource_exhausted(m),
            r @ ApiError::Refused(_) => Status::permission_denied(r.to_string()),
            // Details are logged where handled; callers learn only the kind.
            ApiError::Store(err) => {
                tracing::error!(%err, "storage failure");
                Status::unavailable("controller storage failure; see the controller log")
            }
            ApiError::Internal(err) => {
                tracing::error!(%err, "internal error");
                Status::internal("internal error; see the controller log")
            }
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
