//! S3-compatible storage (AWS S3, Ceph RGW, MinIO, SeaweedFS) through aws-sdk-s3.
//!
//! - Create-only puts use `If-None-Match: *`; a 412 means the object exists.
//! - Objects above `multipart_threshold` go up as multipart uploads, completed with the same
//!   condition; a failed multipart upload is aborted.
//! - The SDK's own retries are disabled: `mover_format::retry` retries transient errors for
//!   every backend alike, so the fault-injecting tests exercise the same path.

use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use bytes::Bytes;
use mover_format::storage::{too_large, ErrorKind, ListPage, ObjectMeta, PutOutcome, Storage, StorageError};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/`.
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub path_style: bool,
    pub multipart_threshold: usize,
    pub part_size: usize,
}

impl S3Options {
    /// Parses `s3://bucket[/prefix]`.
    pub fn from_url(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("'{url}' is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("'{url}' names no bucket"));
        }
        Ok(Self {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            endpoint: None,
            region: None,
            path_style: true,
            multipart_threshold: 64 * 1024 * 1024,
            part_size: 16 * 1024 * 1024,
        })
    }
}

#[derive(Debug, Clone)]
pub struct S3Storage {
    client: Client,
    opts: S3Options,
    location: String,
}

/// An error and its causes in one line ("dispatch failure: io error: … Connection
/// refused"), each said once — not the SDK's debug form.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(x) = cur {
        let t = x.to_string();
        if !parts.last().is_some_and(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = x.source();
    }
    parts.join(": ")
}

/// Whether a request failed because no credentials could be loaded (none configured, or
/// their provider failed), which the SDK reports as a dispatch failure.
fn credentials_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(x) = cur {
        let s = x.to_string();
        if s.contains("loading credentials") || s.contains("provided credentials") || s.contains("credential provider") {
            return true;
        }
        cur = x.source();
    }
    false
}

impl S3Storage {
    /// A response body read into one buffer of `expected` bytes as it arrives (collecting
    /// the chunks and joining them would hold it twice); more than `max_len` bytes is
    /// `too_long(bytes so far)`.
    async fn read_body(
        &self,
        mut body: ByteStream,
        name: &str,
        expected: u64,
        max_len: u64,
        too_long: impl Fn(u64) -> StorageError,
    ) -> Result<Bytes, StorageError> {
        let mut out = bytes::BytesMut::with_capacity(expected.min(max_len) as usize);
        while let Some(chunk) =
            body.try_next().await.map_err(|e| StorageError::new(ErrorKind::Transient, "reading", name, &self.location, format!("body: {e}")))?
        {
            let got = out.len() as u64 + chunk.len() as u64;
            if got > max_len {
                return Err(too_long(got));
            }
            out.extend_from_slice(&chunk);
        }
        Ok(out.freeze())
    }

    pub async fn new(opts: S3Options) -> Self {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(r) = &opts.region {
            loader = loader.region(Region::new(r.clone()));
        }
        let sdk = loader.load().await;
        let mut b = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(opts.path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(5)).operation_attempt_timeout(Duration::from_secs(120)).build());
        if sdk.region().is_none() && opts.region.is_none() {
            b = b.region(Region::new("us-east-1"));
        }
        if let Some(ep) = &opts.endpoint {
            b = b.endpoint_url(ep);
        }
        let client = Client::from_conf(b.build());
        let location = if opts.prefix.is_empty() { format!("s3://{}", opts.bucket) } else { format!("s3://{}/{}", opts.bucket, opts.prefix) };
        Self { client, opts, location }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn key(&self, name: &str) -> String {
        if self.opts.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.opts.prefix)
        }
    }

    fn strip(&self, key: &str) -> String {
        if self.opts.prefix.is_empty() {
            key.to_string()
        } else {
            key.strip_prefix(&format!("{}/", self.opts.prefix)).unwrap_or(key).to_string()
        }
    }

    /// One line naming the store, the object and the cause — the S3 error code, message
    /// and request id, or the transport's chain of causes — never the SDK's debug dump.
    fn classify<E>(&self, op: &'static str, name: &str, e: SdkError<E, HttpResponse>) -> StorageError
    where
        E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
    {
        let (kind, msg) = match &e {
            SdkError::ConstructionFailure(_) => (ErrorKind::Permanent, format!("request could not be built: {}", causes(&e))),
            SdkError::TimeoutError(_) => (ErrorKind::Transient, "timed out".to_string()),
            // The SDK found no credentials, or its provider failed: no retry brings them.
            SdkError::DispatchFailure(_) if credentials_failure(&e) => (
                ErrorKind::Permanent,
                "no S3 credentials: the AWS SDK found none it could use (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web identity)"
                    .to_string(),
            ),
            SdkError::DispatchFailure(_) => (ErrorKind::Transient, format!("store unreachable: {}", causes(&e))),
            SdkError::ResponseError(_) => (ErrorKind::Transient, format!("malformed response: {}", causes(&e))),
            SdkError::ServiceError(s) => {
                let status = http_status(s.raw());
                let kind = match status {
                    401 | 403 => ErrorKind::Denied,
                    404 => ErrorKind::NotFound,
                    408 | 409 | 429 | 500..=599 => ErrorKind::Transient,
                    _ => ErrorKind::Permanent,
                };
                let m = s.err().meta();
                let mut msg = format!("HTTP {status}");
                if let Some(c) = m.code() {
                    msg += &format!(" {c}");
                }
                match m.message() {
                    Some(t) if !t.is_empty() => msg += &format!(": {t}"),
                    _ if m.code().is_none() => msg += &format!(": {}", s.err()),
                    _ => {}
                }
                if let Some(id) = m.extra("aws_request_id").or_else(|| s.raw().headers().get("x-amz-request-id")) {
                    msg += &format!(" (request id {id})");
                }
                (kind, msg)
            }
            _ => (ErrorKind::Transient, format!("request failed: {}", causes(&e))),
        };
        StorageError::new(kind, op, name, &self.location, msg)
    }

    async fn put_multipart(&self, name: &str, key: &str, data: Bytes) -> Result<PutOutcome, StorageError> {
        let up = self.client.create_multipart_upload().bucket(&self.opts.bucket).key(key).send().await.map_err(|e| self.classify("writing", name, e))?;
        let upload_id = up.upload_id().unwrap_or_default().to_string();
        let result = async {
            let mut parts = Vec::new();
            for (i, chunk) in data.chunks(self.opts.part_size).enumerate() {
                let n = i as i32 + 1;
                let r = self
                    .client
                    .upload_part()
                    .bucket(&self.opts.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(n)
                    .body(ByteStream::from(data.slice_ref(chunk)))
                    .send()
                    .await
                    .map_err(|e| self.classify("writing", name, e))?;
                parts.push(CompletedPart::builder().part_number(n).set_e_tag(r.e_tag().map(String::from)).build());
            }
            let done = self
                .client
                .complete_multipart_upload()
                .bucket(&self.opts.bucket)
                .key(key)
                .upload_id(&upload_id)
                .if_none_match("*")
                .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
                .send()
                .await;
            match done {
                Ok(_) => Ok(PutOutcome::Created),
                Err(SdkError::ServiceError(s)) if http_status(s.raw()) == 412 => Ok(PutOutcome::Existed),
                Err(e) => Err(self.classify("writing", name, e)),
            }
        }
        .await;
        if result.as_ref().map(|o| *o != PutOutcome::Created).unwrap_or(true) {
            let _ = self.client.abort_multipart_upload().bucket(&self.opts.bucket).key(key).upload_id(&upload_id).send().await;
        }
        result
    }
}

fn http_status(raw: &HttpResponse) -> u16 {
    raw.status().as_u16()
}

macro_rules! cancellable {
    ($self:ident, $cancel:ident, $op:literal, $name:expr, $fut:expr) => {
        tokio::select! {
            _ = $cancel.cancelled() => Err(StorageError::cancelled($op, $name, &$self.location)),
            r = $fut => r,
        }
    };
}

impl S3Storage {
    /// One page of a listing, from after `after` when given (S3 `StartAfter`; a
    /// continuation token, when present, takes over from it).
    async fn list(&self, prefix: &str, after: Option<&str>, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        let key_prefix = self.key(prefix);
        let start_after = after.map(|a| self.key(a));
        cancellable!(self, cancel, "listing", prefix, async {
            let r = self
                .client
                .list_objects_v2()
                .bucket(&self.opts.bucket)
                .prefix(&key_prefix)
                .set_start_after(start_after)
                .set_continuation_token(token)
                .max_keys(1000)
                .send()
                .await
                .map_err(|e| self.classify("listing", prefix, e))?;
            let objects =
                r.contents().iter().filter_map(|o| o.key().map(|k| ObjectMeta { name: self.strip(k), size: o.size().unwrap_or(0).max(0) as u64 })).collect();
            let next = if r.is_truncated().unwrap_or(false) { r.next_continuation_token().map(String::from) } else { None };
            Ok(ListPage { objects, next })
        })
    }
}

#[async_trait]
impl Storage for S3Storage {
    fn location(&self) -> &str {
        &self.location
    }

    fn is_remote(&self) -> bool {
        true
    }

    async fn put(&self, name: &str, data: Bytes, cancel: &CancellationToken) -> Result<PutOutcome, StorageError> {
        if cancel.is_cancelled() {
            return Err(StorageError::cancelled("writing", name, &self.location));
        }
        let key = self.key(name);
        cancellable!(self, cancel, "writing", name, async {
            if data.len() > self.opts.multipart_threshold {
                return self.put_multipart(name, &key, data).await;
            }
            let r = self.client.put_object().bucket(&self.opts.bucket).key(&key).if_none_match("*").body(ByteStream::from(data)).send().await;
            match r {
                Ok(_) => Ok(PutOutcome::Created),
                Err(SdkError::ServiceError(s)) if http_status(s.raw()) == 412 => Ok(PutOutcome::Existed),
                Err(e) => Err(self.classify("writing", name, e)),
            }
        })
    }

    async fn get(&self, name: &str, max_len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let key = self.key(name);
        cancellable!(self, cancel, "reading", name, async {
            let r = self.client.get_object().bucket(&self.opts.bucket).key(&key).send().await.map_err(|e| self.classify("reading", name, e))?;
            let declared = r.content_length().unwrap_or(0).max(0) as u64;
            if declared > max_len {
                return Err(too_large("reading", name, &self.location, declared, max_len));
            }
            // Read the body with the bound, whatever the header said.
            self.read_body(r.body, name, declared, max_len, |got| too_large("reading", name, &self.location, got, max_len)).await
        })
    }

    async fn get_range(&self, name: &str, offset: u64, len: u64, cancel: &CancellationToken) -> Result<Bytes, StorageError> {
        let key = self.key(name);
        cancellable!(self, cancel, "reading", name, async {
            if len == 0 {
                return match self.head(name, cancel).await? {
                    Some(size) if offset <= size => Ok(Bytes::new()),
                    Some(size) => Err(StorageError::new(
                        ErrorKind::Permanent,
                        "reading",
                        name,
                        &self.location,
                        format!("range {offset}+0 is past the end ({size} bytes)"),
                    )),
                    None => Err(StorageError::new(ErrorKind::NotFound, "reading", name, &self.location, "not found")),
                };
            }
            let range = format!("bytes={}-{}", offset, offset + len - 1);
            let r = match self.client.get_object().bucket(&self.opts.bucket).key(&key).range(range).send().await {
                Ok(r) => r,
                Err(SdkError::ServiceError(s)) if http_status(s.raw()) == 416 => {
                    return Err(StorageError::new(
                        ErrorKind::Permanent,
                        "reading",
                        name,
                        &self.location,
                        format!("range {offset}+{len} is past the end of the object"),
                    ))
                }
                Err(e) => return Err(self.classify("reading", name, e)),
            };
            let out = self
                .read_body(r.body, name, len, len, |_| {
                    StorageError::new(
                        ErrorKind::Permanent,
                        "reading",
                        name,
                        &self.location,
                        format!("range {offset}+{len}: the store sent more than {len} bytes"),
                    )
                })
                .await?;
            if out.len() as u64 != len {
                return Err(StorageError::new(
                    ErrorKind::Permanent,
                    "reading",
                    name,
                    &self.location,
                    format!("range {offset}+{len} is past the end of the object (got {} bytes)", out.len()),
                ));
            }
            Ok(out)
        })
    }

    async fn head(&self, name: &str, cancel: &CancellationToken) -> Result<Option<u64>, StorageError> {
        let key = self.key(name);
        cancellable!(self, cancel, "inspecting", name, async {
            match self.client.head_object().bucket(&self.opts.bucket).key(&key).send().await {
                Ok(r) => Ok(Some(r.content_length().unwrap_or(0).max(0) as u64)),
                Err(SdkError::ServiceError(s)) if http_status(s.raw()) == 404 => Ok(None),
                Err(e) => Err(self.classify("inspecting", name, e)),
            }
        })
    }

    async fn list_page(&self, prefix: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.list(prefix, None, token, cancel).await
    }

    async fn list_page_after(&self, prefix: &str, after: &str, token: Option<String>, cancel: &CancellationToken) -> Result<ListPage, StorageError> {
        self.list(prefix, Some(after), token, cancel).await
    }

    async fn delete(&self, name: &str, cancel: &CancellationToken) -> Result<(), StorageError> {
        let key = self.key(name);
        cancellable!(self, cancel, "deleting", name, async {
            match self.client.delete_object().bucket(&self.opts.bucket).key(&key).send().await {
                Ok(_) => Ok(()),
                Err(SdkError::ServiceError(s)) if http_status(s.raw()) == 404 => Ok(()),
                Err(e) => Err(self.classify("deleting", name, e)),
            }
        })
    }
}
