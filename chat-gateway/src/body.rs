//! Bounded body reading, both ways: a request on the gateway's listener
//! (read before anyone is authenticated) and a response from a platform or
//! integration (a misbehaving server must not fill the gateway's memory).

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;

/// Why a response body was not read whole.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum BodyError {
    #[error("response larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the response: {0}")]
    Read(String),
}

/// Reads at most `limit` bytes of a request `body`: 413 when larger, 400 when the
/// body cannot be read.
pub async fn read_request(body: Body, limit: usize) -> Result<Vec<u8>, Response> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|_| status(StatusCode::BAD_REQUEST, "unreadable body\n"))?;
        if buf.len() + chunk.len() > limit {
            return Err(status(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n"));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
}

fn status(code: StatusCode, text: &'static str) -> Response {
    (code, text).into_response()
}

/// Reads at most `limit` bytes of a response; more is an error.
pub async fn read_response(
    resp: &mut reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(e.without_url().to_string()))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The first `cap` bytes of a response (for error messages): the rest is
/// not read, and a read error ends it.
pub async fn read_response_prefix(mut resp: reqwest::Response, cap: usize) -> Vec<u8> {
    let mut buf = Vec::new();
    while buf.len() < cap {
        match resp.chunk().await {
            Ok(Some(c)) => buf.extend_from_slice(&c),
            _ => break,
        }
    }
    buf.truncate(cap);
    buf
}
