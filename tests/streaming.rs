//! Streaming: chunks cross as they arrive, failures after the headers cut the stream,
//! and a client that leaves cancels the upstream call.
#![allow(clippy::unwrap_used)] // test helpers, like tests, may unwrap

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use common::{MockUpstream, TestApp, jwt};
use tokio::sync::oneshot;

const STREAM: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"stream":true}"#;

fn event(text: &str) -> Bytes {
    Bytes::from(format!(
        "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{text}\"}}}}]}}\n\n"
    ))
}

async fn next_chunk(response: &mut reqwest::Response) -> Option<Bytes> {
    tokio::time::timeout(Duration::from_secs(5), response.chunk())
        .await
        .expect("a chunk in time")
        .unwrap()
}

#[tokio::test]
async fn each_chunk_reaches_the_client_before_the_upstream_sends_the_next() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let mut response = app.chat(STREAM).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (feed, _dropped) = feed.await.unwrap();
    for word in ["one", "two", "three"] {
        feed.send(Ok(event(word))).await.unwrap();
        // The next chunk is only produced after this one was received through the proxy.
        assert_eq!(next_chunk(&mut response).await.unwrap(), event(word));
    }
    feed.send(Ok(Bytes::from_static(b"data: [DONE]\n\n"))).await.unwrap();
    assert_eq!(
        next_chunk(&mut response).await.unwrap(),
        Bytes::from_static(b"data: [DONE]\n\n")
    );
    drop(feed);
    assert_eq!(next_chunk(&mut response).await, None, "a clean end");
    app.shutdown().await;
}

#[tokio::test]
async fn the_mock_openai_stream_passes_through_whole() {
    let upstream = MockUpstream::openai().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let response = app.chat(STREAM).await;
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.starts_with("data: {"), "{text}");
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert_eq!(text.matches("chat.completion.chunk").count(), 3);
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_failure_after_the_headers_cuts_the_stream_without_a_clean_end() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let mut response = app.chat(STREAM).await;
    let (feed, _dropped) = feed.await.unwrap();
    feed.send(Ok(event("partial"))).await.unwrap();
    assert_eq!(next_chunk(&mut response).await.unwrap(), event("partial"));
    feed.send(Err(std::io::Error::other("upstream broke"))).await.unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), response.chunk())
        .await
        .expect("ends in time");
    assert!(end.is_err(), "the client must see an incomplete body, got {end:?}");
    app.shutdown().await;
}

#[tokio::test]
async fn an_upstream_silent_longer_than_the_idle_timeout_cuts_the_stream() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(&upstream.url(), &[("UPSTREAM_IDLE_TIMEOUT_SECONDS", "0.3")]).await;
    let mut response = app.chat(STREAM).await;
    let (feed, mut dropped) = feed.await.unwrap();
    feed.send(Ok(event("a"))).await.unwrap();
    assert_eq!(next_chunk(&mut response).await.unwrap(), event("a"));
    // Then nothing: the proxy gives up after 0.3 s, cuts the client and the upstream.
    let end = tokio::time::timeout(Duration::from_secs(5), response.chunk())
        .await
        .expect("cut in time");
    assert!(end.is_err(), "the client must see an incomplete body, got {end:?}");
    tokio::time::timeout(Duration::from_secs(5), &mut dropped)
        .await
        .expect("upstream body dropped")
        .unwrap();
    drop(feed);
    app.shutdown().await;
}

#[tokio::test]
async fn slow_but_steady_streams_outlive_the_header_timeout() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(
        &upstream.url(),
        &[
            ("UPSTREAM_TIMEOUT_SECONDS", "0.3"),
            ("UPSTREAM_IDLE_TIMEOUT_SECONDS", "0.5"),
        ],
    )
    .await;
    let mut response = app.chat(STREAM).await;
    let (feed, _dropped) = feed.await.unwrap();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        feed.send(Ok(event(&i.to_string()))).await.unwrap();
        assert_eq!(next_chunk(&mut response).await.unwrap(), event(&i.to_string()));
    }
    drop(feed);
    assert_eq!(next_chunk(&mut response).await, None);
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_request_and_its_connection_is_not_reused() {
    let (upstream, feed) = MockUpstream::driven().await;
    let app = TestApp::spawn(&upstream.url(), &[]).await;
    let mut response = app.chat(STREAM).await;
    let (feed, mut dropped) = feed.await.unwrap();
    feed.send(Ok(event("first"))).await.unwrap();
    assert_eq!(next_chunk(&mut response).await.unwrap(), event("first"));
    drop(response);
    tokio::time::timeout(Duration::from_secs(5), &mut dropped)
        .await
        .expect("the upstream body is dropped once the client left")
        .unwrap();
    // The next request cannot use that connection, whose response never ended.
    let next = app.chat(STREAM).await;
    assert_eq!(next.status(), 200);
    next.text().await.unwrap();
    assert_eq!(upstream.requests().len(), 2);
    assert_eq!(upstream.connections(), 2, "the cut stream's connection was not reused");
    drop(feed);
    app.shutdown().await;
}

#[tokio::test]
async fn a_client_that_disconnects_before_the_headers_cancels_the_upstream_request() {
    let (tx, rx) = oneshot::channel::<()>();
    let (entered_tx, entered_rx) = oneshot::channel::<()>();
    let slots = Arc::new(Mutex::new((Some(tx), Some(entered_tx))));
    let router = Router::new().route(
        "/v1/chat/completions",
        post(move || {
            let slots = slots.clone();
            async move {
                // Fires when this handler future is dropped, i.e. the proxy hung up.
                struct Guard(Option<oneshot::Sender<()>>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        if let Some(tx) = self.0.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                let (cancel, entered) = {
                    let mut s = slots.lock().unwrap();
                    (s.0.take(), s.1.take())
                };
                let _guard = Guard(cancel);
                if let Some(entered) = entered {
                    let _ = entered.send(());
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }
        }),
    );
    let upstream = MockUpstream::start(router).await;
    let app = TestApp::spawn(&upstream.url(), &[("UPSTREAM_TIMEOUT_SECONDS", "60")]).await;
    let client = app.client.clone();
    let url = app.url("/v1/chat/completions");
    let request = tokio::spawn(async move { client.post(url).bearer_auth(jwt("demo", "u")).body(STREAM).send().await });
    tokio::time::timeout(Duration::from_secs(5), entered_rx)
        .await
        .unwrap()
        .unwrap();
    request.abort();
    tokio::time::timeout(Duration::from_secs(5), rx)
        .await
        .expect("upstream call cancelled")
        .unwrap();
    app.shutdown().await;
}
