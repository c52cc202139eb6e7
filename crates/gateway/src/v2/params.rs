//! A v2 request's parameters: the query, then the form body over it, as
//! Go's `ParseForm` merges them.

use http::request::Parts;

/// The parameters in the order Go's `Form` holds them: the body's first.
pub(super) struct Params(Vec<(String, String)>);

impl Params {
    pub(super) fn parse(parts: &Parts, body: &[u8]) -> Params {
        let mut params = Vec::new();
        let form = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_none_or(|v| v.starts_with("application/x-www-form-urlencoded"));
        if form && !body.is_empty() {
            params.extend(form_urlencoded::parse(body).into_owned());
        }
        if let Some(query) = parts.uri.query() {
            params.extend(form_urlencoded::parse(query.as_bytes()).into_owned());
        }
        Params(params)
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn flag(&self, name: &str) -> bool {
        self.get(name) == Some("true")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(content_type: &str, query: &str, body: &str) -> Params {
        let request = http::Request::builder()
            .uri(format!("/v2/keys/k?{query}"))
            .header(http::header::CONTENT_TYPE, content_type)
            .body(())
            .expect("a request");
        Params::parse(&request.into_parts().0, body.as_bytes())
    }

    #[test]
    fn forms_decode_as_go_does() {
        let params = parse(
            "application/x-www-form-urlencoded",
            "",
            "value=Hello+world%21&ttl=5&dir&&odd=100%",
        );
        assert_eq!(
            params.0,
            vec![
                ("value".to_string(), "Hello world!".to_string()),
                ("ttl".to_string(), "5".to_string()),
                ("dir".to_string(), String::new()),
                ("odd".to_string(), "100%".to_string()),
            ]
        );
        assert!(!params.flag("dir"), "a bare name is not true");
    }

    #[test]
    fn the_body_comes_before_the_query() {
        let params = parse(
            "application/x-www-form-urlencoded",
            "value=query&wait=true",
            "value=body",
        );
        assert_eq!(params.get("value"), Some("body"));
        assert!(params.flag("wait"));
        let json = parse("application/json", "value=query", "value=body");
        assert_eq!(json.get("value"), Some("query"));
    }
}
