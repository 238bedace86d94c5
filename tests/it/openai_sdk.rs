//! Drop-in compatibility: a real OpenAI client crate pointed at the gateway's base URL.

use async_openai::{
    Client,
    config::OpenAIConfig,
    types::{
        chat::{ChatCompletionRequestUserMessage, CreateChatCompletionRequestArgs},
        embeddings::CreateEmbeddingRequestArgs,
    },
};
use futures_util::StreamExt;

use crate::support::{
    gateway::{TestGateway, config_for},
    upstream::MockUpstream,
};

fn sdk(gateway: &TestGateway) -> Client<OpenAIConfig> {
    Client::with_config(OpenAIConfig::new().with_api_base(gateway.base_url()).with_api_key("sk-sdk-test"))
}

fn chat_request(stream: bool) -> async_openai::types::chat::CreateChatCompletionRequest {
    let mut args = CreateChatCompletionRequestArgs::default();
    args.model("gpt-4o-mini").messages([ChatCompletionRequestUserMessage::from("Say hello").into()]);
    if stream {
        args.stream(true);
    }
    args.build().expect("valid request")
}

#[tokio::test]
async fn chat_completions_work_through_the_gateway() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let response = sdk(&gateway).chat().create(chat_request(false)).await.expect("chat completion");

    assert_eq!(response.choices[0].message.content.as_deref(), Some("hello"));
    assert_eq!(upstream.last_request().header("authorization"), Some("Bearer sk-sdk-test"));
}

#[tokio::test]
async fn streamed_chat_completions_work_through_the_gateway() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let mut stream = sdk(&gateway).chat().create_stream(chat_request(true)).await.expect("stream opens");
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("valid chunk");
        chunks += 1;
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or_default());
        }
    }

    assert!(chunks >= 3, "{chunks} chunks");
    assert!(!text.is_empty());
}

#[tokio::test]
async fn embeddings_work_through_the_gateway() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;
    let request = CreateEmbeddingRequestArgs::default()
        .model("text-embedding-3-small")
        .input(["one", "two"])
        .build()
        .expect("valid request");

    let response = sdk(&gateway).embeddings().create(request).await.expect("embeddings");

    assert_eq!(response.data.len(), 2);
}

#[tokio::test]
async fn models_are_listed_through_the_gateway() {
    let upstream = MockUpstream::new().start().await;
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), "")).await;

    let models = sdk(&gateway).models().list().await.expect("model list");

    assert_eq!(models.data.len(), 2);
}

#[tokio::test]
async fn gateway_errors_reach_the_sdk_as_api_errors() {
    let upstream = MockUpstream::new().start().await;
    let keys = "[auth]\nmode = \"keys\"\n\n[[keys]]\nid = \"a\"\nkey = \"gw-a\"\n";
    let gateway = TestGateway::start(&config_for(&upstream.base_url(), keys)).await;

    let error = sdk(&gateway).chat().create(chat_request(false)).await.expect_err("unknown key refused");

    match error {
        async_openai::error::OpenAIError::ApiError(api) => {
            assert_eq!(api.status_code, 401);
            assert_eq!(api.api_error.code.as_deref(), Some("invalid_api_key"));
        }
        other => panic!("not an API error: {other:?}"),
    }
}
