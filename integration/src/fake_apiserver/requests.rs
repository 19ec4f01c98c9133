//! Requests: authentication, routing, and answers as JSON or `Status` objects.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::query::Query;
use super::routes::{Route, Target};
use super::state::State;
use super::status::Refusal;
use super::{discovery, list, token_review, watch, writes};

/// A whole JSON document, or a watch's stream of events.
pub(super) type Body = Either<Full<Bytes>, Channel<Bytes>>;

/// The largest request body accepted, as a real server's limit.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Answers one request; never fails: refusals become `Status` objects.
pub(super) async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<Body> {
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let response = match answer(state, request).await {
        Ok(response) => response,
        Err(refusal) => json_response(refusal.code, &refusal.status()),
    };
    tracing::debug!(%method, %path, status = response.status().as_u16(), "request");
    response
}

async fn answer(state: Arc<State>, request: Request<Incoming>) -> Result<Response<Body>, Refusal> {
    authenticate(&state, request.headers())?;
    let query = Query::parse(request.uri().query())?;
    let route = Route::parse(request.uri().path()).ok_or_else(Refusal::no_such_resource)?;
    let method = request.method().clone();
    let ok = |value: Value| Ok(json_response(StatusCode::OK, &value));
    match (&method, route) {
        (&Method::GET, Route::Version) => ok(discovery::version_info()),
        (&Method::GET, Route::Health) => Ok(text_response("ok")),
        (&Method::GET, Route::CoreVersions) => ok(discovery::core_versions(&state.server_address)),
        (&Method::GET, Route::Groups) => ok(discovery::groups(&state.store())),
        (&Method::GET, Route::Group(group)) => {
            let group = discovery::group(&state.store(), &group);
            ok(group.ok_or_else(Refusal::no_such_resource)?)
        }
        (&Method::GET, Route::Resources { group, version }) => {
            let resources = discovery::resources(&state.store(), &group, &version);
            ok(resources.ok_or_else(Refusal::no_such_resource)?)
        }
        (&Method::POST, Route::Compact) => {
            state.compact();
            tracing::info!("history compacted; every watch ended");
            ok(
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200}),
            )
        }
        (_, Route::Collection(target)) => {
            served(&state, &target)?;
            collection(state, &method, target, &query, request).await
        }
        (_, Route::Object(target, name)) => {
            served(&state, &target)?;
            object(&state, &method, &target, &name, &query, request).await
        }
        _ => Err(Refusal::method_not_allowed()),
    }
}

async fn collection(
    state: Arc<State>,
    method: &Method,
    target: Target,
    query: &Query,
    request: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    let stored = target.resource.resource().is_stored();
    match *method {
        Method::GET if stored && query.watch => {
            let events = watch::start(state, target, query)?;
            let mut response = Response::new(Either::Right(events));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(response)
        }
        Method::GET if stored => Ok(json_response(
            StatusCode::OK,
            &list::list(&state, &target, query)?,
        )),
        Method::POST if stored => {
            let body = read_body(request).await?;
            let created = writes::create(&state, &target, &body)?;
            Ok(json_response(StatusCode::CREATED, &created))
        }
        Method::POST => {
            let body = read_body(request).await?;
            let known = token_review::known_tokens(state.tokens_file.as_deref())
                .map_err(|e| Refusal::internal(error_chain(&e)))?;
            let review = token_review::review(&known, &body)
                .map_err(|e| Refusal::bad_request(error_chain(&e)))?;
            Ok(json_response(StatusCode::CREATED, &review))
        }
        _ => Err(Refusal::method_not_allowed()),
    }
}

async fn object(
    state: &State,
    method: &Method,
    target: &Target,
    name: &str,
    query: &Query,
    request: Request<Incoming>,
) -> Result<Response<Body>, Refusal> {
    if !target.resource.resource().is_stored() {
        return Err(Refusal::method_not_allowed());
    }
    let object = match *method {
        Method::GET => writes::get(state, target, name)?,
        Method::DELETE => writes::delete(state, target, name)?,
        Method::PATCH => {
            let content_type = request
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let body = read_body(request).await?;
            writes::patch(state, target, name, &content_type, query, &body)?
        }
        _ => return Err(Refusal::method_not_allowed()),
    };
    Ok(json_response(StatusCode::OK, &object))
}

/// Requests must present the server's token.
fn authenticate(state: &State, headers: &HeaderMap) -> Result<(), Refusal> {
    let presented = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if presented == Some(state.token.as_str()) {
        Ok(())
    } else {
        Err(Refusal::unauthorized())
    }
}

/// Custom resources are found only while their definition exists.
fn served(state: &State, target: &Target) -> Result<(), Refusal> {
    if state.store().is_served(target.resource) {
        Ok(())
    } else {
        Err(Refusal::no_such_resource())
    }
}

async fn read_body(request: Request<Incoming>) -> Result<Bytes, Refusal> {
    Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|_| Refusal::request_too_large())
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *response.status_mut() = code;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn text_response(text: &'static str) -> Response<Body> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from_static(text.as_bytes()))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

/// `error` and its causes, for messages and logs.
pub(super) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
