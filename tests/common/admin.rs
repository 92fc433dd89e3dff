//! Test-side tools for lb's `--admin` endpoint: finding its address in the
//! log, a small HTTP/1.1 client, a strict parser of the Prometheus text
//! exposition format, and a minimal JSON parser for `/stats`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use super::{Proc, WAIT, wait_until};

/// The admin address lb logged (`admin endpoint on http://ADDR`).
pub fn admin_addr(lb: &Proc) -> SocketAddr {
    let mut found = None;
    wait_until(WAIT, || {
        found = lb
            .stderr_text()
            .lines()
            .find_map(|l| l.split("admin endpoint on http://").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|a| a.parse().ok());
        found.is_some()
    });
    found.unwrap_or_else(|| panic!("lb logged no admin address: {}", lb.stderr_text()))
}

/// One HTTP response, read to EOF.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Sends raw request bytes and reads the response until the server closes.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect_timeout(&addr, WAIT).expect("connect to admin");
    s.set_read_timeout(Some(WAIT)).expect("timeout");
    s.set_write_timeout(Some(WAIT)).expect("timeout");
    s.write_all(request).expect("send request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read response to EOF");
    parse_response(&raw)
}

pub fn parse_response(raw: &[u8]) -> Response {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head_len = match r.parse(raw) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("incomplete or bad response {other:?}: {:?}", String::from_utf8_lossy(raw)),
    };
    let headers: Vec<(String, String)> =
        r.headers.iter().map(|h| (h.name.to_string(), String::from_utf8_lossy(h.value).into_owned())).collect();
    let body = String::from_utf8(raw[head_len..].to_vec()).expect("UTF-8 body");
    Response { status: r.code.expect("status"), headers, body }
}

/// A GET whose body must match its `Content-Length`.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    let r = raw_request(addr, format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes());
    let len = r.header("Content-Length").expect("Content-Length");
    assert_eq!(len.parse::<usize>().expect("Content-Length"), r.body.len(), "body length");
    r
}

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
}

/// A parsed exposition: samples in order, and each family's type.
#[derive(Debug, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
}

impl Exposition {
    /// The value of the one sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
            .collect();
        assert_eq!(found.len(), 1, "exactly one {name}{labels:?}, found {found:?}");
        found[0].value
    }

    pub fn backend(&self, name: &str, backend: SocketAddr) -> f64 {
        self.value(name, &[("backend", &backend.to_string())])
    }

    /// Sum over every sample of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples.iter().filter(|s| s.name == name).map(|s| s.value).sum()
    }
}

fn is_metric_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn is_label_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with("__")
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse::<f64>().map_err(|_| format!("bad value '{s}'")),
    }
}

/// Parses `name{k="v",...} value` strictly.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("no value")?;
    let name = &line[..name_end];
    if !is_metric_name(name) {
        return Err(format!("bad metric name '{name}'"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without '='")?;
            let key = &rest[..eq];
            if !is_label_name(key) {
                return Err(format!("bad label name '{key}'"));
            }
            rest = rest[eq + 1..].strip_prefix('"').ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                match chars.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape {other:?}")),
                    },
                    Some((_, '\n')) => return Err("raw newline in label value".into()),
                    Some((_, c)) => value.push(c),
                }
            };
            if labels.iter().any(|(k, _): &(String, String)| k == key) {
                return Err(format!("label '{key}' twice"));
            }
            labels.push((key.to_string(), value));
            rest = &rest[end + 1..];
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err("labels not separated by ','".into());
            }
        }
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().ok_or("no value")?)?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp '{ts}'"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

/// The family a sample belongs to, given the declared types.
fn family_of<'a>(name: &'a str, types: &HashMap<String, String>) -> &'a str {
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix)
            && types.get(base).is_some_and(|t| t == "histogram" || t == "summary")
        {
            return base;
        }
    }
    name
}

/// Parses text format 0.0.4 strictly: HELP/TYPE syntax and order, names,
/// labels, values, one contiguous block per family, no duplicate series,
/// `_total` counters, and histogram buckets that are cumulative with a
/// `+Inf` bucket equal to `_count`.
pub fn parse_exposition(text: &str) -> Result<Exposition, String> {
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    let mut exp = Exposition::default();
    let mut helped: Vec<String> = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    let mut seen_series: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
        if line.is_empty() {
            return Err(at("empty line".into()));
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').ok_or_else(|| at("HELP without text".into()))?;
            if !is_metric_name(name) || help.trim().is_empty() {
                return Err(at("bad HELP".into()));
            }
            if helped.iter().any(|h| h == name) {
                return Err(at("second HELP".into()));
            }
            helped.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').ok_or_else(|| at("TYPE without type".into()))?;
            if !is_metric_name(name) {
                return Err(at("bad TYPE name".into()));
            }
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                return Err(at(format!("unknown type '{kind}'")));
            }
            if exp.types.contains_key(name) || finished.iter().any(|f| f == name) || current.as_deref() == Some(name) {
                return Err(at("TYPE after the family's samples or twice".into()));
            }
            if kind == "counter" && !name.ends_with("_total") {
                return Err(at("counter without _total".into()));
            }
            exp.types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') {
            return Err(at("comment that is neither HELP nor TYPE".into()));
        }
        let sample = parse_sample(line).map_err(at)?;
        let family = family_of(&sample.name, &exp.types).to_string();
        if !exp.types.contains_key(&family) {
            return Err(at("sample before its TYPE".into()));
        }
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at("family split in two blocks".into()));
            }
            if let Some(prev) = current.take() {
                finished.push(prev);
            }
            current = Some(family.clone());
        }
        let mut key_labels = sample.labels.clone();
        key_labels.sort();
        let key = (sample.name.clone(), key_labels);
        if seen_series.contains(&key) {
            return Err(at("duplicate series".into()));
        }
        seen_series.push(key);
        if exp.types[&family] == "counter" && (sample.value < 0.0 || sample.value.is_nan()) {
            return Err(at("negative counter".into()));
        }
        exp.samples.push(sample);
    }
    check_histograms(&exp)?;
    Ok(exp)
}

/// A series' labels other than `le`.
type Labels = Vec<(String, String)>;

fn check_histograms(exp: &Exposition) -> Result<(), String> {
    for (family, kind) in &exp.types {
        if kind != "histogram" {
            continue;
        }
        // Group buckets by their labels other than `le`.
        let mut series: HashMap<Labels, Vec<(f64, f64)>> = HashMap::new();
        for s in exp.samples.iter().filter(|s| s.name == format!("{family}_bucket")) {
            let le = parse_value(s.label("le").ok_or("bucket without le")?)?;
            let rest: Vec<_> = s.labels.iter().filter(|(k, _)| k != "le").cloned().collect();
            series.entry(rest).or_default().push((le, s.value));
        }
        for (labels, buckets) in series {
            let mut last = (f64::NEG_INFINITY, 0.0);
            for &(le, count) in &buckets {
                if le <= last.0 || count < last.1 {
                    return Err(format!("{family}{labels:?}: buckets not increasing/cumulative"));
                }
                last = (le, count);
            }
            if last.0 != f64::INFINITY {
                return Err(format!("{family}{labels:?}: no +Inf bucket"));
            }
            let matching =
                |suffix: &str| exp.samples.iter().find(|s| s.name == format!("{family}{suffix}") && s.labels == labels);
            let count = matching("_count").ok_or_else(|| format!("{family}{labels:?}: no _count"))?;
            matching("_sum").ok_or_else(|| format!("{family}{labels:?}: no _sum"))?;
            if count.value != last.1 {
                return Err(format!("{family}{labels:?}: +Inf bucket {} != count {}", last.1, count.value));
            }
        }
    }
    Ok(())
}

/// Scrapes and strictly parses `/metrics`.
pub fn scrape(admin: SocketAddr) -> Exposition {
    let r = get(admin, "/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    parse_exposition(&r.body).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{}", r.body))
}

/// Whether lb's metrics say `backend` is up.
pub fn backend_up(admin: SocketAddr, backend: SocketAddr) -> bool {
    scrape(admin).backend("lb_backend_up", backend) == 1.0
}

/// Polls until `backend`'s up flag equals `up`, up to `limit`.
pub fn wait_backend(admin: SocketAddr, backend: SocketAddr, up: bool, limit: Duration) -> bool {
    wait_until(limit, || backend_up(admin, backend) == up)
}

/// A JSON value, enough to read `/stats`.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Number(f64),
    String(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    pub fn get(&self, key: &str) -> &Json {
        match self {
            Json::Object(fields) => {
                &fields.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no key {key} in {self:?}")).1
            }
            _ => panic!("not an object: {self:?}"),
        }
    }

    pub fn num(&self) -> f64 {
        match self {
            Json::Number(n) => *n,
            _ => panic!("not a number: {self:?}"),
        }
    }

    pub fn items(&self) -> &[Json] {
        match self {
            Json::Array(v) => v,
            _ => panic!("not an array: {self:?}"),
        }
    }
}

/// Parses one JSON document (RFC 8259), rejecting trailing bytes.
pub fn parse_json(text: &str) -> Result<Json, String> {
    let mut p = JsonParser { s: text.as_bytes(), i: 0 };
    let v = p.value()?;
    p.ws();
    if p.i != p.s.len() {
        return Err(format!("trailing bytes at {}", p.i));
    }
    Ok(v)
}

struct JsonParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && matches!(self.s[self.i], b' ' | b'\t' | b'\n' | b'\r') {
            self.i += 1;
        }
    }

    fn eat(&mut self, lit: &str) -> bool {
        if self.s[self.i..].starts_with(lit.as_bytes()) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut fields = Vec::new();
                self.ws();
                if self.eat("}") {
                    return Ok(Json::Object(fields));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.ws();
                    if !self.eat(":") {
                        return Err(format!("':' expected at {}", self.i));
                    }
                    fields.push((k, self.value()?));
                    self.ws();
                    if self.eat("}") {
                        return Ok(Json::Object(fields));
                    }
                    if !self.eat(",") {
                        return Err(format!("',' or '}}' expected at {}", self.i));
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut items = Vec::new();
                self.ws();
                if self.eat("]") {
                    return Ok(Json::Array(items));
                }
                loop {
                    items.push(self.value()?);
                    self.ws();
                    if self.eat("]") {
                        return Ok(Json::Array(items));
                    }
                    if !self.eat(",") {
                        return Err(format!("',' or ']' expected at {}", self.i));
                    }
                }
            }
            Some(b'"') => Ok(Json::String(self.string()?)),
            Some(b't') if self.eat("true") => Ok(Json::Bool(true)),
            Some(b'f') if self.eat("false") => Ok(Json::Bool(false)),
            Some(b'n') if self.eat("null") => Ok(Json::Null),
            Some(c) if *c == b'-' || c.is_ascii_digit() => {
                let start = self.i;
                while self.i < self.s.len() && matches!(self.s[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.s[start..self.i]).map_err(|e| e.to_string())?;
                let leading_zero = t.trim_start_matches('-').starts_with('0')
                    && t.trim_start_matches('-').len() > 1
                    && !t.trim_start_matches('-')[1..].starts_with(['.', 'e', 'E']);
                if leading_zero || t.ends_with('.') || t.starts_with('.') {
                    return Err(format!("bad number {t}"));
                }
                t.parse().map(Json::Number).map_err(|_| format!("bad number {t}"))
            }
            other => Err(format!("unexpected {other:?} at {}", self.i)),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        if !self.eat("\"") {
            return Err(format!("string expected at {}", self.i));
        }
        let mut out = String::new();
        loop {
            let rest = std::str::from_utf8(&self.s[self.i..]).map_err(|e| e.to_string())?;
            let mut chars = rest.chars();
            let c = chars.next().ok_or("unterminated string")?;
            self.i += c.len_utf8();
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'"' => out.push('"'),
                        b'\\' => out.push('\\'),
                        b'/' => out.push('/'),
                        b'n' => out.push('\n'),
                        b'r' => out.push('\r'),
                        b't' => out.push('\t'),
                        b'b' => out.push('\u{8}'),
                        b'f' => out.push('\u{c}'),
                        b'u' => {
                            let hex = std::str::from_utf8(self.s.get(self.i..self.i + 4).ok_or("short \\u")?)
                                .map_err(|e| e.to_string())?;
                            let code = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
                            self.i += 4;
                            out.push(char::from_u32(code).ok_or("surrogate escape")?);
                        }
                        _ => return Err(format!("bad escape at {}", self.i)),
                    }
                }
                c if (c as u32) < 0x20 => return Err("raw control character in string".into()),
                c => out.push(c),
            }
        }
    }
}
