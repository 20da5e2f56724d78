//! The analyst's SQL subset, parsed into phm.v1 query parts. Nodes never see SQL: the
//! client turns it into a structured query and signs that.
//!
//! Accepted: `SELECT` group keys and `COUNT(*)`, `SUM(col)`, `AVG(col)` (with `AS`
//! aliases), `FROM dataset [alias]`, a `WHERE` of comparisons with literals, `IN`,
//! `BETWEEN`, `IS [NOT] NULL`, `AND`/`OR`/`NOT`, and `GROUP BY` columns or
//! `bin(col, width)`. Columns are written alone or as `alias.col`.
//!
//! A linked question adds one `[NOT] EXISTS` as a top-level `AND` condition of the
//! `WHERE` (or as the whole `WHERE`), which becomes a [`Linkage`]:
//!
//! ```sql
//! SELECT imd_quintile, COUNT(*) AS patients FROM gp_patients g
//! WHERE g.diabetes = TRUE
//!   AND EXISTS (SELECT 1 FROM acute_admissions a
//!               WHERE a.person = g.person AND a.method = 'emergency'
//!               [GROUP BY a.person HAVING COUNT(*) >= k])
//! GROUP BY imd_quintile
//! ```
//!
//! The subquery selects `1` (or `*`) from one aliased partner dataset; its `WHERE` holds
//! the correlation `a.person = g.person` (either way round) as a top-level `AND`
//! condition, and its other conditions, in the outer grammar, are the partner filter.
//! `person` is a pseudo-column, each dataset's declared link key: it may appear only in
//! the correlation and in `GROUP BY a.person`, never as a value, filter or key.
//! `HAVING COUNT(*) >= k` takes `1 <= k <= MAX_MIN_PARTNER_ROWS`.
//!
//! Everything else is refused with the offending token's position and a hint.

use phm_proto::query::{
    Linkage, MAX_AGGREGATES, MAX_GROUP_KEYS, MAX_ID_LEN, MAX_MIN_PARTNER_ROWS, MAX_PREDICATE_DEPTH,
    MAX_PREDICATE_NODES, MAX_TEXT_LITERAL_LEN,
};
use phm_proto::{Aggregate, AggregateKind, CompareOp, GroupKey, Literal, Predicate};
use sqlparser::ast::{
    BinaryOperator, DataType, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    Ident, ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr, Spanned, Statement,
    TableAlias, TableFactor, UnaryOperator, Value,
};
use sqlparser::dialect::GenericDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::{Parser, ParserError};
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};

/// Longest SQL text accepted, in bytes.
pub const MAX_SQL_LEN: usize = 16 * 1024;
/// Most tokens (other than whitespace) accepted; keeps parse trees shallow enough
/// that nothing recurses dangerously deep.
pub const MAX_TOKENS: usize = 2_000;
/// Up to this many tokens, errors point at the exact AST node (computing its span
/// recurses through it); beyond, at the statement.
const SPAN_TOKENS: usize = 600;

/// A parsed query: everything of a `QueryBody` that comes from the SQL text.
#[derive(Debug, Clone, PartialEq)]
pub struct SqlQuery {
    pub dataset: String,
    pub filter: Option<Predicate>,
    pub group_by: Vec<GroupKey>,
    pub aggregates: Vec<Aggregate>,
    /// The `[NOT] EXISTS (...)` of a linked question, if any.
    pub linkage: Option<Linkage>,
}

/// Why SQL was refused, pointing at the offending token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at byte {offset}); hint: {hint}")]
pub struct SqlError {
    pub message: String,
    pub hint: String,
    /// Byte offset of the offending token in the SQL text.
    pub offset: usize,
    /// Its length in bytes (at least 1 when the text is not empty).
    pub len: usize,
}

impl SqlError {
    /// The message, the SQL line holding the token, a caret under it, and the hint.
    pub fn render(&self, sql: &str) -> String {
        let offset = floor_char_boundary(sql, self.offset.min(sql.len()));
        let line_start = sql[..offset].rfind('\n').map_or(0, |i| i + 1);
        let line_end = sql[offset..].find('\n').map_or(sql.len(), |i| offset + i);
        let line = sql[line_start..line_end].trim_end_matches('\r');
        let line_no = sql[..line_start].matches('\n').count() + 1;
        // Tabs stay tabs so the caret lines up in a terminal.
        let pad: String = sql[line_start..offset]
            .chars()
            .map(|c| if c == '\t' { '\t' } else { ' ' })
            .collect();
        let end = floor_char_boundary(sql, (offset + self.len).min(line_end));
        let width = sql[offset..end].chars().count().max(1);
        let mut out = format!("error: {}\n", self.message);
        if sql.contains('\n') {
            out.push_str(&format!("  --> line {line_no}\n"));
        }
        out.push_str(&format!("   | {line}\n   | {pad}{}\n", "^".repeat(width)));
        out.push_str(&format!("hint: {}", self.hint));
        out
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

const FORM: &str = "the supported form is SELECT keys, COUNT(*) | SUM(col) | AVG(col) [AS name] \
                    FROM dataset [WHERE conditions] [GROUP BY keys]";

/// The linked form, for hints about EXISTS.
const LINK_FORM: &str = "link with FROM dataset g WHERE [NOT] EXISTS (SELECT 1 FROM other a WHERE \
                         a.person = g.person [AND conditions on a] \
                         [GROUP BY a.person HAVING COUNT(*) >= k])";

const JOIN_HINT: &str = "each query reads one dataset; to count people who also appear in another, \
                         write FROM dataset g WHERE EXISTS (SELECT 1 FROM other a WHERE \
                         a.person = g.person ...)";

const PERSON_HINT: &str = "person stands for each dataset's declared link key, which no query \
                           reads or names: it appears only in the EXISTS correlation \
                           a.person = g.person and the subquery's GROUP BY a.person";

/// Parse analyst SQL into query parts, or say exactly what is not supported and where.
pub fn parse(sql: &str) -> Result<SqlQuery, SqlError> {
    let pos = Positions::new(sql);
    if sql.len() > MAX_SQL_LEN {
        return Err(SqlError {
            message: format!(
                "the query is {} bytes long; at most {MAX_SQL_LEN} are accepted",
                sql.len()
            ),
            hint: "split it into smaller queries".into(),
            offset: MAX_SQL_LEN,
            len: 1,
        });
    }
    let dialect = GenericDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(|e| SqlError {
            message: format!("SQL syntax error: {}", e.message),
            hint: FORM.into(),
            offset: pos.offset(e.location),
            len: 1,
        })?;
    let tokens = prescan(tokens, &pos)?;
    let statements = Parser::new(&dialect)
        .with_recursion_limit(48)
        .with_tokens_with_locations(tokens.clone())
        .parse_statements()
        .map_err(|e| parser_error(e, &pos, &tokens))?;
    let [Statement::Query(query)] = statements.as_slice() else {
        return Err(SqlError {
            message: "only a single SELECT query is supported".into(),
            hint: FORM.into(),
            offset: 0,
            len: sql.len().max(1),
        });
    };
    Converter {
        pos: &pos,
        small: tokens.len() <= SPAN_TOKENS,
        tokens: &tokens,
        scope: Scope::default(),
    }
    .query(query)
}

/// Byte offsets from sqlparser's 1-based line/column (columns count characters).
struct Positions<'a> {
    sql: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> Positions<'a> {
    fn new(sql: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(sql.match_indices('\n').map(|(i, _)| i + 1));
        Positions { sql, line_starts }
    }

    fn offset(&self, l: Location) -> usize {
        let Some(&start) = usize::try_from(l.line)
            .ok()
            .and_then(|line| line.checked_sub(1))
            .and_then(|i| self.line_starts.get(i))
        else {
            return 0;
        };
        let col = usize::try_from(l.column).unwrap_or(1).saturating_sub(1);
        self.sql[start..]
            .char_indices()
            .nth(col)
            .map_or(self.sql.len(), |(i, _)| start + i)
    }

    fn error(&self, span: Span, message: impl Into<String>, hint: impl Into<String>) -> SqlError {
        let (offset, len) = if span.start.line == 0 {
            (0, self.sql.len())
        } else {
            let a = self.offset(span.start);
            let b = self.offset(span.end);
            (a, b.saturating_sub(a))
        };
        SqlError {
            message: message.into(),
            hint: hint.into(),
            offset,
            len: len.max(1),
        }
    }
}

fn keyword(t: &Token) -> Option<Keyword> {
    match t {
        Token::Word(w) if w.quote_style.is_none() => Some(w.keyword),
        _ => None,
    }
}

/// Refuse, token by token, what the subset never supports, so the caret lands on the
/// keyword itself; also drops a trailing semicolon.
fn prescan(
    tokens: Vec<TokenWithSpan>,
    pos: &Positions<'_>,
) -> Result<Vec<TokenWithSpan>, SqlError> {
    let mut out: Vec<TokenWithSpan> = Vec::with_capacity(tokens.len());
    let mut scan = Scan::default();
    let mut after_semicolon = false;
    let mut count = 0usize;
    let tokens: Vec<TokenWithSpan> = tokens
        .into_iter()
        .filter(|t| !matches!(t.token, Token::Whitespace(_)))
        .collect();
    for (i, t) in tokens.iter().enumerate() {
        let t = t.clone();
        let err = |m: &str, h: &str| Err(pos.error(t.span, m, h));
        if after_semicolon {
            return err(
                "only one statement is allowed",
                "send each query on its own, without a second statement after ';'",
            );
        }
        if t.token == Token::SemiColon {
            after_semicolon = true;
            continue;
        }
        count += 1;
        if count > MAX_TOKENS {
            return err(
                &format!("the query has more than {MAX_TOKENS} tokens"),
                "split it into smaller queries",
            );
        }
        let next = tokens.get(i + 1).map(|n| &n.token);
        if !operator_allowed(&t.token, out.last().map(|p| &p.token), next) {
            return err(
                "arithmetic and operators other than comparisons are not supported",
                "compare a column with a literal, e.g. age >= 65 or sex IN ('F', 'M')",
            );
        }
        if let Some(k) = keyword(&t.token) {
            if out.is_empty() && k != Keyword::SELECT {
                return err("only SELECT queries are supported", FORM);
            }
            if let Some((m, h)) = scan.refusal(k, &out) {
                return err(m, h);
            }
            scan.seen_select |= k == Keyword::SELECT;
            scan.seen_exists |= k == Keyword::EXISTS;
        } else if out.is_empty() {
            return err("only SELECT queries are supported", FORM);
        }
        scan.follow_parentheses(&t.token, out.last().map(|p| &p.token));
        out.push(t);
    }
    if out.is_empty() {
        return Err(SqlError {
            message: "the query is empty".into(),
            hint: FORM.into(),
            offset: 0,
            len: pos.sql.len().max(1),
        });
    }
    Ok(out)
}

/// What the prescan has seen so far, and where it is relative to the one
/// `EXISTS (SELECT ...)` a linked query may have.
#[derive(Default)]
struct Scan {
    seen_select: bool,
    seen_exists: bool,
    /// Parenthesis depth at the current token.
    depth: usize,
    /// The depth of the EXISTS subquery's `(`, while the scan is inside it.
    exists_at: Option<usize>,
}

impl Scan {
    fn follow_parentheses(&mut self, t: &Token, prev: Option<&Token>) {
        match t {
            Token::LParen => {
                self.depth += 1;
                if self.exists_at.is_none() && prev.and_then(keyword) == Some(Keyword::EXISTS) {
                    self.exists_at = Some(self.depth);
                }
            }
            Token::RParen => {
                if self.exists_at == Some(self.depth) {
                    self.exists_at = None;
                }
                self.depth = self.depth.saturating_sub(1);
            }
            _ => {}
        }
    }

    /// A SELECT right after `EXISTS (` opens the linked subquery.
    fn opens_exists(out: &[TokenWithSpan]) -> bool {
        match out {
            [.., e, p] => p.token == Token::LParen && keyword(&e.token) == Some(Keyword::EXISTS),
            _ => false,
        }
    }

    /// Why keyword `k` is refused here, if it is: (message, hint).
    fn refusal(&self, k: Keyword, out: &[TokenWithSpan]) -> Option<(&'static str, &'static str)> {
        use Keyword as K;
        match k {
            K::SELECT if self.seen_select && !Scan::opens_exists(out) => Some((
                "subqueries are not supported",
                "write one SELECT over one dataset (a linked query adds one EXISTS (SELECT 1 \
                 FROM other a WHERE a.person = g.person ...)); run separate queries and combine \
                 the answers",
            )),
            K::EXISTS if self.seen_exists => Some((
                "only one EXISTS is supported per query",
                "a query links to one partner dataset: put every condition on it inside the one \
                 EXISTS (...), and ask about a second partner in a separate query",
            )),
            K::JOIN
            | K::INNER
            | K::LEFT
            | K::RIGHT
            | K::FULL
            | K::CROSS
            | K::NATURAL
            | K::OUTER
            | K::LATERAL => Some(("joins are not supported", JOIN_HINT)),
            K::UNION | K::INTERSECT | K::EXCEPT | K::MINUS => Some((
                "set operations (UNION, INTERSECT, EXCEPT) are not supported",
                "run separate queries and combine the answers",
            )),
            K::WITH => Some((
                "WITH (common table expressions) is not supported",
                "write one SELECT over one dataset",
            )),
            K::ORDER | K::SORT => Some((
                "ORDER BY is not supported",
                "results come back in group-key order; sort them after they arrive",
            )),
            K::LIMIT | K::OFFSET | K::FETCH | K::TOP => Some((
                "LIMIT is not supported",
                "every group cell is released or suppressed; a limit would depend on noisy values",
            )),
            K::HAVING if self.exists_at.is_none() => Some((
                "HAVING is not supported",
                "filter rows with WHERE; small cells are suppressed by the node's policy \
                 (only a linked EXISTS subquery takes GROUP BY a.person HAVING COUNT(*) >= k)",
            )),
            K::DISTINCT => Some((
                "DISTINCT is not supported",
                "counts are already of people: each person contributes a bounded number of rows",
            )),
            K::OVER | K::WINDOW | K::PARTITION | K::QUALIFY => {
                Some(("window functions are not supported", "use GROUP BY"))
            }
            K::INTO => Some(("SELECT INTO is not supported", FORM)),
            K::CASE => Some((
                "CASE expressions are not supported",
                "group by a declared column or bin(col, width)",
            )),
            _ => None,
        }
    }
}

/// Operators the subset has: comparisons, `*` only in `COUNT(*)` and `SELECT *` (which
/// is refused later with a better message), `-` only as the sign of a number. Refusing
/// arithmetic here also means no long operator chains reach the parser.
fn operator_allowed(t: &Token, prev: Option<&Token>, next: Option<&Token>) -> bool {
    match t {
        Token::Mul => {
            matches!((prev, next), (Some(Token::LParen), Some(Token::RParen)))
                || matches!(prev, Some(Token::Comma))
                || prev.and_then(keyword) == Some(Keyword::SELECT)
        }
        Token::Minus => {
            let operand_before = match prev {
                Some(Token::Number(..) | Token::RParen | Token::SingleQuotedString(_)) => true,
                Some(Token::Word(w)) => w.keyword == Keyword::NoKeyword || w.quote_style.is_some(),
                _ => false,
            };
            matches!(next, Some(Token::Number(..))) && !operand_before
        }
        Token::Plus
        | Token::Div
        | Token::Mod
        | Token::DuckIntDiv
        | Token::StringConcat
        | Token::Caret
        | Token::Ampersand
        | Token::Pipe
        | Token::ShiftLeft
        | Token::ShiftRight
        | Token::DoubleColon
        | Token::Arrow
        | Token::LongArrow
        | Token::HashArrow
        | Token::HashLongArrow
        | Token::Sharp
        | Token::Tilde
        | Token::LBracket
        | Token::ExclamationMark => false,
        _ => true,
    }
}

fn parser_error(e: ParserError, pos: &Positions<'_>, tokens: &[TokenWithSpan]) -> SqlError {
    let raw = match e {
        ParserError::RecursionLimitExceeded => {
            return SqlError {
                message: "the query nests too deeply".into(),
                hint: "remove some parentheses or split the query".into(),
                offset: 0,
                len: pos.sql.len().max(1),
            };
        }
        ParserError::TokenizerError(m) | ParserError::ParserError(m) => m,
    };
    // sqlparser appends " at Line: L, Column: C" to its messages.
    let (message, offset) = match raw.rsplit_once(" at Line: ") {
        Some((m, loc)) => {
            let mut it = loc.split(", Column: ");
            let line = it.next().and_then(|l| l.trim().parse().ok());
            let column = it.next().and_then(|c| c.trim().parse().ok());
            match (line, column) {
                (Some(line), Some(column)) => {
                    (m.to_string(), pos.offset(Location { line, column }))
                }
                _ => (raw.clone(), pos.sql.len()),
            }
        }
        None => (raw.clone(), pos.sql.len()),
    };
    let len = tokens
        .iter()
        .find(|t| pos.offset(t.span.start) == offset)
        .map_or(1, |t| pos.offset(t.span.end).saturating_sub(offset).max(1));
    SqlError {
        message: format!("SQL syntax error: {message}"),
        hint: FORM.into(),
        offset,
        len,
    }
}

/// A SELECT item once classified.
enum Item {
    Key(GroupKey, Span),
    Agg(Aggregate, Span),
}

/// A group key and where it is written.
type Keyed = (GroupKey, Span);

/// Which table aliases a column reference may use where it is read.
#[derive(Debug, Clone, Default)]
struct Scope {
    /// The alias of the dataset read here, if it has one.
    alias: Option<String>,
    /// Inside the EXISTS subquery, the outer dataset's alias, which only the
    /// correlation `a.person = g.person` may name.
    outer: Option<String>,
}

/// The dataset after FROM.
struct Source {
    dataset: String,
    /// Its alias, and where the alias is written.
    alias: Option<(String, Span)>,
    /// Where the dataset name is written.
    span: Span,
}

struct Converter<'a, 'b> {
    pos: &'a Positions<'b>,
    /// Whether the query is small enough to compute node spans, which sqlparser does
    /// recursively over the whole subtree.
    small: bool,
    tokens: &'a [TokenWithSpan],
    scope: Scope,
}

impl<'a, 'b> Converter<'a, 'b> {
    /// The same converter, reading columns in another scope.
    fn within(&self, scope: Scope) -> Converter<'a, 'b> {
        Converter {
            pos: self.pos,
            small: self.small,
            tokens: self.tokens,
            scope,
        }
    }

    /// The span of an AST node; for a large query, the whole statement instead, so
    /// that a hostile, deeply chained expression cannot exhaust the stack.
    fn sp<T: Spanned>(&self, node: &T) -> Span {
        if self.small {
            node.span()
        } else {
            Span::empty()
        }
    }

    /// An expression's span, with function calls running to their closing parenthesis.
    fn esp(&self, e: &Expr) -> Span {
        match e {
            Expr::Function(f) => self.call_span(f),
            _ => self.sp(e),
        }
    }

    /// sqlparser's span of a call stops at its last argument (or its name, for
    /// `COUNT(*)`); extend it to the matching `)`.
    fn call_span(&self, f: &sqlparser::ast::Function) -> Span {
        let name = self.sp(&f.name);
        if name.start.line == 0 {
            return name;
        }
        let Some(open) = self.tokens.iter().position(|t| t.span.start == name.end) else {
            return self.sp(f);
        };
        let mut depth = 0usize;
        for t in &self.tokens[open..] {
            match t.token {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth = depth.saturating_sub(1);
                    if depth == 0 {
                        return Span::new(name.start, t.span.end);
                    }
                }
                _ => {}
            }
        }
        self.sp(f)
    }

    fn err<T>(
        &self,
        span: Span,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Result<T, SqlError> {
        Err(self.pos.error(span, message, hint))
    }

    fn query(&self, q: &Query) -> Result<SqlQuery, SqlError> {
        let s = self.plain_query(q)?;
        self.select(s)
    }

    /// The SELECT of a query with no WITH, ORDER BY, LIMIT or other wrapping.
    fn plain_query<'q>(&self, q: &'q Query) -> Result<&'q Select, SqlError> {
        // Spans of whole queries are unions over every node, computed recursively:
        // point at the statement as a whole instead.
        let span = Span::empty();
        if q.with.is_some()
            || q.order_by.is_some()
            || q.limit_clause.is_some()
            || q.fetch.is_some()
            || !q.locks.is_empty()
            || q.for_clause.is_some()
            || q.settings.is_some()
            || q.format_clause.is_some()
            || !q.pipe_operators.is_empty()
        {
            return self.err(span, "only a plain SELECT is supported", FORM);
        }
        match q.body.as_ref() {
            SetExpr::Select(s) => Ok(s),
            SetExpr::Query(inner) => self.err(
                self.sp(inner.as_ref()),
                "a parenthesised query is not supported",
                "remove the outer parentheses",
            ),
            other => self.err(self.sp(other), "only a plain SELECT is supported", FORM),
        }
    }

    fn select(&self, s: &Select) -> Result<SqlQuery, SqlError> {
        self.plain_select(s, false)?;
        let source = self.from(s)?;
        let outer = self.within(Scope {
            alias: source.alias.as_ref().map(|(a, _)| a.clone()),
            outer: None,
        });
        let (keys, aggregates) = outer.projection(s)?;
        let group_by = outer.outer_group_by(&s.group_by, &keys)?;
        let (filter, linkage) = outer.where_clause(s.selection.as_ref(), &source)?;
        Ok(SqlQuery {
            dataset: source.dataset,
            filter,
            group_by,
            aggregates,
            linkage,
        })
    }

    /// Refuse SELECT clauses outside the subset; HAVING only in a linked subquery.
    fn plain_select(&self, s: &Select, linked: bool) -> Result<(), SqlError> {
        if s.distinct.is_some()
            || s.top.is_some()
            || s.into.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || (s.having.is_some() && !linked)
            || !s.named_window.is_empty()
            || s.qualify.is_some()
            || s.value_table_mode.is_some()
            || s.exclude.is_some()
        {
            return self.err(
                s.select_token.0.span,
                "this SELECT uses a clause that is not supported",
                FORM,
            );
        }
        Ok(())
    }

    /// The SELECT list: group keys (with where they are written) and aggregates.
    fn projection(&self, s: &Select) -> Result<(Vec<Keyed>, Vec<Aggregate>), SqlError> {
        let mut keys: Vec<Keyed> = Vec::new();
        let mut aggregates: Vec<(Aggregate, Span)> = Vec::new();
        for item in &s.projection {
            match self.select_item(item)? {
                Item::Key(k, sp) => keys.push((k, sp)),
                Item::Agg(a, sp) => {
                    if aggregates.iter().any(|(b, _)| b.alias == a.alias) {
                        return self.err(
                            sp,
                            format!("the name {:?} is used for two aggregates", a.alias),
                            "give each aggregate its own name with AS",
                        );
                    }
                    aggregates.push((a, sp));
                }
            }
        }
        if aggregates.is_empty() {
            return self.err(
                s.select_token.0.span,
                "the query selects no aggregate",
                "select COUNT(*), SUM(col) or AVG(col); nodes release aggregates only",
            );
        }
        if aggregates.len() > MAX_AGGREGATES {
            return self.err(
                aggregates[MAX_AGGREGATES].1,
                format!("at most {MAX_AGGREGATES} aggregates per query"),
                "split the query",
            );
        }
        Ok((keys, aggregates.into_iter().map(|(a, _)| a).collect()))
    }

    /// The outer GROUP BY, which must list exactly the selected keys.
    fn outer_group_by(
        &self,
        g: &GroupByExpr,
        keys: &[(GroupKey, Span)],
    ) -> Result<Vec<GroupKey>, SqlError> {
        let group_by = self.group_by(g)?;
        for (k, sp) in keys {
            if !group_by.iter().any(|(g, _)| g == k) {
                return self.err(
                    *sp,
                    format!("{} is selected but not in GROUP BY", k.label()),
                    "add it to GROUP BY, or remove it from SELECT",
                );
            }
        }
        for (g, sp) in &group_by {
            if !keys.iter().any(|(k, _)| k == g) {
                return self.err(
                    *sp,
                    format!("{} is in GROUP BY but not selected", g.label()),
                    "add it to SELECT so the results are labelled with it",
                );
            }
        }
        if group_by.len() > MAX_GROUP_KEYS {
            return self.err(
                group_by[MAX_GROUP_KEYS].1,
                format!("at most {MAX_GROUP_KEYS} group keys per query"),
                "group by fewer keys",
            );
        }
        Ok(group_by.into_iter().map(|(g, _)| g).collect())
    }

    /// The outer WHERE: the filter, and the linkage when one of its top-level AND
    /// conditions is `[NOT] EXISTS (...)`.
    fn where_clause(
        &self,
        selection: Option<&Expr>,
        source: &Source,
    ) -> Result<(Option<Predicate>, Option<Linkage>), SqlError> {
        let Some(e) = selection else {
            return Ok((None, None));
        };
        let parts = conjuncts(e);
        let mut rest = Vec::with_capacity(parts.len());
        let mut link = None;
        for p in parts {
            match (as_exists(p), link.is_some()) {
                (None, _) => rest.push(p),
                (Some(x), false) => link = Some(x),
                (Some(_), true) => {
                    return self.err(
                        self.exists_keyword(1),
                        "only one EXISTS is supported per query",
                        "a query links to one partner dataset; ask about another in a separate query",
                    );
                }
            }
        }
        let Some((subquery, negated)) = link else {
            return Ok((Some(self.predicate(e, 0, &mut 0)?), None));
        };
        let filter = self.conjunction(&rest)?;
        Ok((filter, Some(self.linkage(subquery, negated, source)?)))
    }

    /// AND conditions left once EXISTS or the correlation is taken out, as one filter.
    fn conjunction(&self, parts: &[&Expr]) -> Result<Option<Predicate>, SqlError> {
        match parts {
            [] => Ok(None),
            [one] => Ok(Some(self.predicate(one, 0, &mut 0)?)),
            many => {
                // Counted as the AND node `predicate` would have made of them.
                let mut nodes = 1;
                let parts = many
                    .iter()
                    .map(|p| self.predicate(p, 1, &mut nodes))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Some(Predicate::All(parts)))
            }
        }
    }

    fn from(&self, s: &Select) -> Result<Source, SqlError> {
        let Some(first) = s.from.first() else {
            return self.err(
                s.select_token.0.span,
                "FROM dataset is missing",
                "name the dataset, e.g. SELECT COUNT(*) FROM gp_patients",
            );
        };
        if let Some(second) = s.from.get(1) {
            return self.err(
                self.sp(second),
                "only one dataset can be queried",
                JOIN_HINT,
            );
        }
        if let Some(j) = first.joins.first() {
            return self.err(self.sp(j), "joins are not supported", JOIN_HINT);
        }
        let TableFactor::Table { name, alias, .. } = &first.relation else {
            return self.err(
                self.sp(&first.relation),
                "only a dataset name is supported after FROM (no subqueries or functions)",
                "write FROM dataset, e.g. FROM gp_patients",
            );
        };
        self.bare_table(&first.relation, name)?;
        Ok(Source {
            dataset: self.object_name(name, "dataset")?,
            alias: alias.as_ref().map(|a| self.table_alias(a)).transpose()?,
            span: self.sp(name),
        })
    }

    /// Any decoration but an alias (arguments, hints, sampling) changes how the
    /// relation prints; a bare name prints as itself.
    fn bare_table(&self, relation: &TableFactor, name: &ObjectName) -> Result<(), SqlError> {
        let mut bare = relation.clone();
        if let TableFactor::Table { alias, .. } = &mut bare {
            *alias = None;
        }
        if bare.to_string() != name.to_string() {
            return self.err(
                self.sp(relation),
                "only a bare dataset name is supported after FROM",
                "write FROM dataset [alias], e.g. FROM gp_patients g",
            );
        }
        Ok(())
    }

    fn table_alias(&self, a: &TableAlias) -> Result<(String, Span), SqlError> {
        let extra = a
            .columns
            .first()
            .map(|c| c.name.span)
            .or(a.at.as_ref().map(|i| i.span));
        if let Some(span) = extra {
            return self.err(
                span,
                "a table alias can only name the dataset",
                "write FROM dataset g, without column names after the alias",
            );
        }
        Ok((self.ident(&a.name, "alias")?, a.name.span))
    }

    fn object_name(&self, name: &ObjectName, what: &str) -> Result<String, SqlError> {
        match name.0.as_slice() {
            [ObjectNamePart::Identifier(ident)] => self.ident(ident, what),
            _ => self.err(
                self.sp(name),
                format!("a qualified {what} name is not supported"),
                format!("write the {what} name alone, without a prefix"),
            ),
        }
    }

    /// A column, dataset or alias name: unquoted names fold to lower case, as in
    /// PostgreSQL; names must be valid on the wire.
    fn ident(&self, ident: &Ident, what: &str) -> Result<String, SqlError> {
        let name = folded(ident);
        let ok = !name.is_empty()
            && name.len() <= MAX_ID_LEN
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return self.err(
                ident.span,
                format!("{what} name {name:?} is not valid"),
                format!("{what} names use letters, digits and _ (at most {MAX_ID_LEN})"),
            );
        }
        Ok(name)
    }

    /// A column read here: alone or qualified by this scope's alias, never `person`.
    fn column(&self, e: &Expr) -> Result<String, SqlError> {
        let name = self.ident(self.column_ident(e)?, "column")?;
        if name == "person" {
            return self.err(
                self.esp(e),
                "person is not a column that can be read",
                PERSON_HINT,
            );
        }
        Ok(name)
    }

    /// The name part of a column reference, once its qualifier (if any) is checked.
    fn column_ident<'e>(&self, e: &'e Expr) -> Result<&'e Ident, SqlError> {
        match e {
            Expr::Identifier(i) => Ok(i),
            Expr::CompoundIdentifier(parts) => match parts.as_slice() {
                [q, c] => self.qualifier(q, e).map(|()| c),
                _ => self.err(
                    self.esp(e),
                    "qualified column names are not supported",
                    "write the column name alone, or after the dataset's alias: g.col",
                ),
            },
            _ => self.err(self.esp(e), "expected a column name here", FORM),
        }
    }

    /// A column's qualifier must be the alias of the dataset read here.
    fn qualifier(&self, q: &Ident, e: &Expr) -> Result<(), SqlError> {
        let q = folded(q);
        let span = self.esp(e);
        match (&self.scope.alias, &self.scope.outer) {
            (Some(own), _) if *own == q => Ok(()),
            (Some(own), Some(outer)) if *outer == q => self.err(
                span,
                format!("only {own}.person = {outer}.person may correlate"),
                format!(
                    "conditions inside EXISTS read {own}'s columns ({own}.col or col); put \
                     conditions on {outer} in the outer WHERE"
                ),
            ),
            (Some(own), _) => self.err(
                span,
                format!("{q} is not the alias of the dataset read here"),
                format!("qualify columns with {own}, or write them alone"),
            ),
            (None, _) => self.err(
                span,
                "qualified column names are not supported without a table alias",
                "write the column name alone, or alias the dataset (FROM gp_patients g) and \
                 write g.col",
            ),
        }
    }

    fn select_item(&self, item: &SelectItem) -> Result<Item, SqlError> {
        let (expr, alias) = match item {
            SelectItem::UnnamedExpr(e) => (e, None),
            SelectItem::ExprWithAlias { expr, alias } => (expr, Some(alias)),
            SelectItem::Wildcard(_) | SelectItem::QualifiedWildcard(..) => {
                return self.err(
                    self.sp(item),
                    "SELECT * is not supported: nodes never return rows",
                    "name the group keys and aggregates, e.g. SELECT sex, COUNT(*) FROM gp_patients GROUP BY sex",
                );
            }
            SelectItem::ExprWithAliases { .. } => {
                return self.err(self.sp(item), "multiple aliases are not supported", FORM);
            }
        };
        let span = self.esp(expr);
        let aggregate = |kind: AggregateKind, column: Option<String>, default: String| {
            let alias = match alias {
                Some(a) => self.ident(a, "alias")?,
                None => default,
            };
            Ok(Item::Agg(
                Aggregate {
                    alias,
                    kind,
                    column,
                },
                span,
            ))
        };
        let key = |k: GroupKey| -> Result<Item, SqlError> {
            if let Some(a) = alias {
                return self.err(
                    a.span,
                    format!("group key {} cannot be renamed", k.label()),
                    format!("results label it {:?}; remove AS {}", k.label(), a.value),
                );
            }
            Ok(Item::Key(k, span))
        };
        match expr {
            Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                key(GroupKey::Column(self.column(expr)?))
            }
            Expr::Function(f) => {
                let name = self.object_name(&f.name, "function")?;
                match name.as_str() {
                    "count" => {
                        let args = self.args(f, 1)?;
                        match args[0] {
                            FunctionArg::Unnamed(FunctionArgExpr::Wildcard) => {
                                aggregate(AggregateKind::Count, None, "count".into())
                            }
                            _ => self.err(
                                self.call_span(f),
                                "only COUNT(*) is supported",
                                "COUNT(*) counts rows (per person, bounded); to count non-missing \
                                 values add WHERE col IS NOT NULL",
                            ),
                        }
                    }
                    "sum" | "avg" => {
                        let args = self.args(f, 1)?;
                        let col = self.arg_column(args[0], self.call_span(f))?;
                        let (kind, default) = if name == "sum" {
                            (AggregateKind::Sum, format!("sum_{col}"))
                        } else {
                            (AggregateKind::Mean, format!("avg_{col}"))
                        };
                        aggregate(kind, Some(col), default)
                    }
                    "bin" => key(self.bin(f)?),
                    other => self.err(
                        self.sp(&f.name),
                        format!("function {other}() is not supported"),
                        "supported: COUNT(*), SUM(col), AVG(col), and bin(col, width) as a group key",
                    ),
                }
            }
            Expr::Value(_) => self.err(
                span,
                "a constant cannot be selected",
                "select group keys and aggregates only",
            ),
            _ => self.err(
                span,
                "only column names, bin(col, width) and COUNT/SUM/AVG can be selected",
                FORM,
            ),
        }
    }

    /// The arguments of a plain function call, exactly `n` of them.
    fn args<'f>(
        &self,
        f: &'f sqlparser::ast::Function,
        n: usize,
    ) -> Result<Vec<&'f FunctionArg>, SqlError> {
        let plain = f.filter.is_none()
            && f.over.is_none()
            && f.null_treatment.is_none()
            && f.within_group.is_empty()
            && matches!(f.parameters, FunctionArguments::None);
        let FunctionArguments::List(list) = &f.args else {
            return self.err(self.call_span(f), "expected arguments in parentheses", FORM);
        };
        if !plain || list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
            return self.err(
                self.call_span(f),
                "function modifiers are not supported",
                FORM,
            );
        }
        if list.args.len() != n {
            return self.err(
                self.call_span(f),
                format!(
                    "{}() takes {n} argument{}, got {}",
                    f.name,
                    if n == 1 { "" } else { "s" },
                    list.args.len()
                ),
                "e.g. COUNT(*), SUM(bmi), AVG(age), bin(age, 10)",
            );
        }
        Ok(list.args.iter().collect())
    }

    fn arg_column(&self, a: &FunctionArg, span: Span) -> Result<String, SqlError> {
        match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => self.column(e),
            _ => self.err(
                span,
                "expected a column name as the argument",
                "e.g. SUM(bmi)",
            ),
        }
    }

    fn bin(&self, f: &sqlparser::ast::Function) -> Result<GroupKey, SqlError> {
        let args = self.args(f, 2)?;
        let column = self.arg_column(args[0], self.call_span(f))?;
        let width = match args[1] {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => match self.literal(e)? {
                Literal::Integer(i) => i as f64,
                Literal::Real(r) => r,
                _ => {
                    return self.err(
                        self.esp(e),
                        "bin width must be a number",
                        "e.g. bin(age, 10)",
                    );
                }
            },
            _ => {
                return self.err(
                    self.call_span(f),
                    "bin width must be a number",
                    "e.g. bin(age, 10)",
                );
            }
        };
        if !(width.is_finite() && width > 0.0) {
            return self.err(
                self.call_span(f),
                format!("bin width must be above 0, got {width}"),
                "e.g. bin(age, 10)",
            );
        }
        Ok(GroupKey::Bin { column, width })
    }

    fn group_by(&self, g: &GroupByExpr) -> Result<Vec<(GroupKey, Span)>, SqlError> {
        let exprs = match g {
            GroupByExpr::Expressions(exprs, modifiers) => {
                if !modifiers.is_empty() {
                    return self.err(
                        exprs.last().map_or(Span::empty(), Spanned::span),
                        "GROUP BY modifiers (ROLLUP, CUBE, TOTALS) are not supported",
                        "group by plain keys; totals are separate queries",
                    );
                }
                exprs
            }
            GroupByExpr::All(_) => {
                return self.err(
                    Span::empty(),
                    "GROUP BY ALL is not supported",
                    "list the keys",
                );
            }
        };
        let mut out: Vec<(GroupKey, Span)> = Vec::new();
        for e in exprs {
            let k = match e {
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) => {
                    GroupKey::Column(self.column(e)?)
                }
                Expr::Function(f) if self.object_name(&f.name, "function")? == "bin" => {
                    self.bin(f)?
                }
                Expr::Value(_) => {
                    return self.err(
                        self.esp(e),
                        "GROUP BY by position is not supported",
                        "name the key, e.g. GROUP BY sex",
                    );
                }
                _ => {
                    return self.err(
                        self.esp(e),
                        "GROUP BY accepts column names and bin(col, width) only",
                        "e.g. GROUP BY sex, bin(age, 10)",
                    );
                }
            };
            if out.iter().any(|(x, _)| *x == k) {
                return self.err(
                    self.esp(e),
                    format!("{} is grouped by twice", k.label()),
                    "list each key once",
                );
            }
            out.push((k, self.esp(e)));
        }
        Ok(out)
    }

    fn literal(&self, e: &Expr) -> Result<Literal, SqlError> {
        let span = self.esp(e);
        match e {
            Expr::Value(v) => match &v.value {
                Value::Number(s, _) => self.number(s, false, span),
                Value::SingleQuotedString(s) => {
                    if s.len() > MAX_TEXT_LITERAL_LEN {
                        return self.err(
                            span,
                            format!("text longer than {MAX_TEXT_LITERAL_LEN} bytes"),
                            "use a shorter value",
                        );
                    }
                    Ok(Literal::Text(s.clone()))
                }
                Value::Boolean(b) => Ok(Literal::Boolean(*b)),
                Value::Null => self.err(
                    span,
                    "NULL cannot be compared",
                    "write col IS NULL or col IS NOT NULL",
                ),
                _ => self.err(
                    span,
                    "this kind of literal is not supported",
                    "use integers, decimals, 'text' or TRUE/FALSE",
                ),
            },
            Expr::UnaryOp {
                op: op @ (UnaryOperator::Minus | UnaryOperator::Plus),
                expr,
            } => match expr.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::Number(s, _) => self.number(s, *op == UnaryOperator::Minus, span),
                    _ => self.err(span, "a sign applies to numbers only", "e.g. -5"),
                },
                _ => self.err(span, "a sign applies to numbers only", "e.g. -5"),
            },
            Expr::TypedString(t) if t.data_type == DataType::Date => match &t.value.value {
                Value::SingleQuotedString(s) => Ok(Literal::Text(s.clone())),
                _ => self.err(
                    span,
                    "write dates as DATE 'YYYY-MM-DD'",
                    "e.g. DATE '2026-04-01'",
                ),
            },
            _ => self.err(
                span,
                "expected a literal value here",
                "compare a column with a literal: integers, decimals, 'text', TRUE/FALSE",
            ),
        }
    }

    fn number(&self, s: &str, negative: bool, span: Span) -> Result<Literal, SqlError> {
        let text = if negative {
            format!("-{s}")
        } else {
            s.to_string()
        };
        if !s.contains(['.', 'e', 'E']) {
            return text.parse::<i64>().map(Literal::Integer).or_else(|_| {
                self.err(
                    span,
                    format!("integer {text} is out of range"),
                    "use a smaller number",
                )
            });
        }
        match text.parse::<f64>() {
            Ok(r) if r.is_finite() => Ok(Literal::Real(r)),
            _ => self.err(
                span,
                format!("number {text} is not a finite decimal"),
                "use a smaller number",
            ),
        }
    }

    fn predicate(&self, e: &Expr, depth: usize, nodes: &mut usize) -> Result<Predicate, SqlError> {
        *nodes += 1;
        if depth > MAX_PREDICATE_DEPTH || *nodes > MAX_PREDICATE_NODES {
            return self.err(
                self.esp(e),
                format!(
                    "the WHERE clause is too complex (at most {MAX_PREDICATE_DEPTH} levels and \
                     {MAX_PREDICATE_NODES} conditions)"
                ),
                "simplify the conditions, e.g. with IN (...)",
            );
        }
        match e {
            Expr::Nested(inner) => self.predicate(inner, depth, nodes),
            Expr::BinaryOp {
                op: op @ (BinaryOperator::And | BinaryOperator::Or),
                ..
            } => {
                let parts = flatten(e, op)
                    .into_iter()
                    .map(|p| self.predicate(p, depth + 1, nodes))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(if *op == BinaryOperator::And {
                    Predicate::All(parts)
                } else {
                    Predicate::Any(parts)
                })
            }
            Expr::BinaryOp { left, op, right } => self.comparison(e, left, op, right),
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => Ok(Predicate::Not(Box::new(self.predicate(
                expr,
                depth + 1,
                nodes,
            )?))),
            Expr::InList {
                expr,
                list,
                negated,
            } => {
                let column = self.column(expr)?;
                *nodes += list.len();
                if *nodes > MAX_PREDICATE_NODES {
                    return self.err(
                        self.esp(e),
                        format!("at most {MAX_PREDICATE_NODES} values in all IN lists together"),
                        "shorten the list",
                    );
                }
                let values = list
                    .iter()
                    .map(|v| self.literal(v))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Predicate::InList {
                    column,
                    values,
                    negated: *negated,
                })
            }
            Expr::Between {
                expr,
                negated,
                low,
                high,
            } => Ok(Predicate::Between {
                column: self.column(expr)?,
                low: self.literal(low)?,
                high: self.literal(high)?,
                negated: *negated,
            }),
            Expr::IsNull(inner) => Ok(Predicate::IsNull {
                column: self.column(inner)?,
                negated: false,
            }),
            Expr::IsNotNull(inner) => Ok(Predicate::IsNull {
                column: self.column(inner)?,
                negated: true,
            }),
            Expr::Exists { .. } => self.err(
                self.exists_keyword(0),
                "EXISTS must be a condition of its own, joined to the others with AND",
                "write WHERE conditions AND [NOT] EXISTS (...); EXISTS cannot sit under OR, or \
                 under NOT of a group of conditions",
            ),
            Expr::InSubquery { subquery, .. } => self.err(
                self.sp(subquery.as_ref()),
                "subqueries are not supported",
                "list the values: col IN (1, 2, 3)",
            ),
            Expr::Identifier(i) => self.err(
                self.esp(e),
                format!("{} alone is not a condition", i.value),
                format!("compare it, e.g. {} = TRUE", i.value),
            ),
            Expr::IsTrue(inner) | Expr::IsFalse(inner) => self.err(
                self.esp(e),
                "IS TRUE / IS FALSE is not supported",
                format!("write {inner} = TRUE or {inner} = FALSE"),
            ),
            Expr::Like { .. } | Expr::ILike { .. } | Expr::SimilarTo { .. } => self.err(
                self.esp(e),
                "pattern matching (LIKE) is not supported",
                "list the values with IN (...)",
            ),
            _ => self.err(
                self.esp(e),
                "this condition is not supported",
                "use comparisons (=, <>, <, <=, >, >=) with literals, IN, BETWEEN, IS [NOT] NULL, \
                 AND, OR, NOT",
            ),
        }
    }

    fn comparison(
        &self,
        e: &Expr,
        left: &Expr,
        op: &BinaryOperator,
        right: &Expr,
    ) -> Result<Predicate, SqlError> {
        let op = match op {
            BinaryOperator::Eq => CompareOp::Eq,
            BinaryOperator::NotEq => CompareOp::Ne,
            BinaryOperator::Lt => CompareOp::Lt,
            BinaryOperator::LtEq => CompareOp::Le,
            BinaryOperator::Gt => CompareOp::Gt,
            BinaryOperator::GtEq => CompareOp::Ge,
            other => {
                return self.err(
                    self.esp(e),
                    format!("operator {other} is not supported"),
                    "use =, <>, !=, <, <=, >, >=",
                );
            }
        };
        let is_col = |x: &Expr| matches!(x, Expr::Identifier(_) | Expr::CompoundIdentifier(_));
        match (is_col(left), is_col(right)) {
            (true, true) => {
                self.misplaced_correlation(e)?;
                self.column_ident(left)?;
                self.column_ident(right)?;
                self.err(
                    self.esp(right),
                    "comparing two columns is not supported",
                    "compare a column with a literal value, e.g. age >= 65",
                )
            }
            (true, false) => Ok(Predicate::Compare {
                column: self.column(left)?,
                op,
                value: self.literal(right)?,
            }),
            // `65 <= age` reads as `age >= 65`.
            (false, true) => Ok(Predicate::Compare {
                column: self.column(right)?,
                op: match op {
                    CompareOp::Lt => CompareOp::Gt,
                    CompareOp::Le => CompareOp::Ge,
                    CompareOp::Gt => CompareOp::Lt,
                    CompareOp::Ge => CompareOp::Le,
                    same => same,
                },
                value: self.literal(left)?,
            }),
            (false, false) => self.err(
                self.esp(e),
                "a comparison needs a column on one side",
                "e.g. age >= 65",
            ),
        }
    }
}

// The linked subquery: `[NOT] EXISTS (SELECT 1 FROM other a WHERE a.person = g.person
// [AND conditions] [GROUP BY a.person HAVING COUNT(*) >= k])`.
impl Converter<'_, '_> {
    fn linkage(&self, q: &Query, negated: bool, outer: &Source) -> Result<Linkage, SqlError> {
        let s = self.plain_query(q)?;
        self.plain_select(s, true)?;
        let outer_alias = self.outer_alias(outer)?;
        let partner = self.from(s)?;
        let alias = self.partner_alias(&partner, &outer_alias)?;
        self.exists_projection(s)?;
        let inner = self.within(Scope {
            alias: Some(alias),
            outer: Some(outer_alias),
        });
        Ok(Linkage {
            partner_dataset: partner.dataset,
            partner_filter: inner.partner_filter(s.selection.as_ref())?,
            negated,
            min_partner_rows: inner.min_partner_rows(s)?,
        })
    }

    /// The outer dataset's alias, which the correlation needs.
    fn outer_alias(&self, outer: &Source) -> Result<String, SqlError> {
        match &outer.alias {
            Some((a, _)) => Ok(a.clone()),
            None => self.err(
                outer.span,
                "a linked query needs an alias for its dataset",
                format!(
                    "write FROM {} g, and correlate with a.person = g.person",
                    outer.dataset
                ),
            ),
        }
    }

    /// The partner dataset's alias: required, and not the outer one.
    fn partner_alias(&self, partner: &Source, outer_alias: &str) -> Result<String, SqlError> {
        match &partner.alias {
            None => self.err(
                partner.span,
                "the dataset inside EXISTS needs an alias",
                format!(
                    "write FROM {} a ... WHERE a.person = {outer_alias}.person",
                    partner.dataset
                ),
            ),
            Some((a, span)) if a == outer_alias => self.err(
                *span,
                format!("the alias {a} is already the outer dataset's"),
                format!(
                    "give {} its own alias, e.g. FROM {} a",
                    partner.dataset, partner.dataset
                ),
            ),
            Some((a, _)) => Ok(a.clone()),
        }
    }

    /// The subquery selects `1` (or `*`): it only asks whether partner rows exist.
    fn exists_projection(&self, s: &Select) -> Result<(), SqlError> {
        let one = |item: &SelectItem| match item {
            SelectItem::Wildcard(_) => true,
            SelectItem::UnnamedExpr(Expr::Value(v)) => {
                matches!(&v.value, Value::Number(n, _) if n == "1")
            }
            _ => false,
        };
        match s.projection.as_slice() {
            [item] if one(item) => Ok(()),
            items => {
                let bad = items.iter().find(|i| !one(i)).or(items.get(1));
                self.err(
                    bad.map_or(s.select_token.0.span, |i| self.sp(i)),
                    "the subquery of EXISTS must select 1",
                    LINK_FORM,
                )
            }
        }
    }

    /// The subquery's WHERE: the correlation, and the partner filter from the rest.
    fn partner_filter(&self, selection: Option<&Expr>) -> Result<Option<Predicate>, SqlError> {
        let parts = selection.map(conjuncts).unwrap_or_default();
        let mut rest = Vec::with_capacity(parts.len());
        let mut correlated = false;
        for p in parts {
            if !self.is_correlation(p) {
                rest.push(p);
            } else if correlated {
                return self.err(
                    self.esp(p),
                    "the correlation is written twice",
                    "write it once",
                );
            } else {
                correlated = true;
            }
        }
        let filter = self.conjunction(&rest)?;
        if !correlated {
            let (a, g) = self.aliases();
            return self.err(
                self.exists_keyword(0),
                format!("the EXISTS subquery is not correlated by {a}.person = {g}.person"),
                format!(
                    "add {a}.person = {g}.person to the subquery's WHERE, joined with AND; \
                     {LINK_FORM}"
                ),
            );
        }
        Ok(filter)
    }

    /// This scope's alias and the outer one, for messages.
    fn aliases(&self) -> (&str, &str) {
        (
            self.scope.alias.as_deref().unwrap_or("a"),
            self.scope.outer.as_deref().unwrap_or("g"),
        )
    }

    /// Whether `e` is `a.person = g.person` (either way round) for this scope.
    fn is_correlation(&self, e: &Expr) -> bool {
        let Expr::BinaryOp {
            left,
            op: BinaryOperator::Eq,
            right,
        } = e
        else {
            return false;
        };
        let (Some(own), Some(outer)) = (&self.scope.alias, &self.scope.outer) else {
            return false;
        };
        match (person_qualifier(left), person_qualifier(right)) {
            (Some(l), Some(r)) => (l == *own && r == *outer) || (l == *outer && r == *own),
            _ => false,
        }
    }

    /// The correlation reached the filter grammar: it sits under OR or NOT.
    fn misplaced_correlation(&self, e: &Expr) -> Result<(), SqlError> {
        if !self.is_correlation(e) {
            return Ok(());
        }
        let (a, g) = self.aliases();
        self.err(
            self.esp(e),
            format!("{a}.person = {g}.person must be a condition of its own"),
            "join the correlation to the subquery's other conditions with AND, not OR or NOT",
        )
    }

    /// `k` of `GROUP BY a.person HAVING COUNT(*) >= k`; 1 without them.
    fn min_partner_rows(&self, s: &Select) -> Result<u32, SqlError> {
        let (a, _) = self.aliases();
        match (&s.having, self.partner_group_by(&s.group_by)?) {
            (None, None) => Ok(1),
            (None, Some(span)) => self.err(
                span,
                format!("GROUP BY {a}.person needs HAVING COUNT(*) >= k"),
                format!(
                    "add HAVING COUNT(*) >= k for people with at least k rows in the partner \
                     dataset, or drop GROUP BY {a}.person"
                ),
            ),
            (Some(h), None) => self.err(
                self.token_before(self.esp(h)),
                format!("HAVING needs GROUP BY {a}.person"),
                format!("write GROUP BY {a}.person HAVING COUNT(*) >= k"),
            ),
            (Some(h), Some(_)) => self.having_count(h),
        }
    }

    /// Whether the subquery is grouped by `a.person` (where, if so); any other
    /// GROUP BY is refused.
    fn partner_group_by(&self, g: &GroupByExpr) -> Result<Option<Span>, SqlError> {
        let (a, _) = self.aliases();
        let message = format!("the subquery of EXISTS can group by {a}.person only");
        let hint = format!("write GROUP BY {a}.person HAVING COUNT(*) >= k");
        let exprs = match g {
            GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => exprs,
            GroupByExpr::Expressions(exprs, _) => {
                let span = exprs.last().map_or(Span::empty(), |e| self.esp(e));
                return self.err(span, message, hint);
            }
            GroupByExpr::All(_) => return self.err(Span::empty(), message, hint),
        };
        let is_key = |e: &Expr| person_qualifier(e).as_deref() == Some(a);
        match exprs.as_slice() {
            [] => Ok(None),
            [e] if is_key(e) => Ok(Some(self.esp(e))),
            es => {
                let bad = es.iter().find(|e| !is_key(e)).or(es.get(1));
                self.err(bad.map_or(Span::empty(), |e| self.esp(e)), message, hint)
            }
        }
    }

    /// `COUNT(*) >= k`, with `k` from 1 to `MAX_MIN_PARTNER_ROWS`.
    fn having_count(&self, h: &Expr) -> Result<u32, SqlError> {
        let hint = format!(
            "write HAVING COUNT(*) >= k with a whole k from 1 to {MAX_MIN_PARTNER_ROWS} \
             (for more than 3 rows, >= 4)"
        );
        let h = strip_nested(h);
        let right = match h {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::GtEq,
                right,
            } if self.is_count_star(left) => right,
            _ => return self.err(self.esp(h), "only HAVING COUNT(*) >= k is supported", hint),
        };
        let k = match self.literal(right)? {
            Literal::Integer(k) => u32::try_from(k).ok(),
            _ => None,
        };
        match k {
            Some(k) if (1..=MAX_MIN_PARTNER_ROWS).contains(&k) => Ok(k),
            _ => self.err(
                self.esp(right),
                format!("k of HAVING COUNT(*) >= k must be from 1 to {MAX_MIN_PARTNER_ROWS}"),
                hint,
            ),
        }
    }

    fn is_count_star(&self, e: &Expr) -> bool {
        let Expr::Function(f) = e else {
            return false;
        };
        let count = matches!(f.name.0.as_slice(),
            [ObjectNamePart::Identifier(i)] if folded(i) == "count");
        count
            && matches!(
                self.args(f, 1).as_deref(),
                Ok([FunctionArg::Unnamed(FunctionArgExpr::Wildcard)])
            )
    }

    /// Where the `n`th EXISTS keyword is (the prescan lets at most one through).
    fn exists_keyword(&self, n: usize) -> Span {
        self.tokens
            .iter()
            .filter(|t| keyword(&t.token) == Some(Keyword::EXISTS))
            .nth(n)
            .map_or(Span::empty(), |t| t.span)
    }

    /// The token just before the one `span` starts at (e.g. HAVING before its
    /// condition); `span` itself when there is none.
    fn token_before(&self, span: Span) -> Span {
        self.tokens
            .iter()
            .position(|t| t.span.start == span.start)
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| self.tokens.get(i))
            .map_or(span, |t| t.span)
    }
}

/// The top-level AND conditions of a WHERE, through parentheses, without recursion.
fn conjuncts(e: &Expr) -> Vec<&Expr> {
    let mut out = Vec::new();
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        match x {
            Expr::Nested(inner) => stack.push(inner),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                stack.push(right);
                stack.push(left);
            }
            other => out.push(other),
        }
    }
    out
}

/// `[NOT] EXISTS (query)`, through parentheses, as (query, negated).
fn as_exists(e: &Expr) -> Option<(&Query, bool)> {
    let mut negated = false;
    let mut x = e;
    loop {
        match x {
            Expr::Nested(inner) => x = inner,
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => {
                negated = !negated;
                x = expr;
            }
            Expr::Exists {
                subquery,
                negated: n,
            } => return Some((subquery, negated != *n)),
            _ => return None,
        }
    }
}

fn strip_nested(mut e: &Expr) -> &Expr {
    while let Expr::Nested(inner) = e {
        e = inner;
    }
    e
}

/// An identifier as the subset names it: unquoted names fold to lower case.
fn folded(ident: &Ident) -> String {
    if ident.quote_style.is_some() {
        ident.value.clone()
    } else {
        ident.value.to_lowercase()
    }
}

/// `q` of a reference `q.person`.
fn person_qualifier(e: &Expr) -> Option<String> {
    match e {
        Expr::CompoundIdentifier(parts) => match parts.as_slice() {
            [q, c] if folded(c) == "person" => Some(folded(q)),
            _ => None,
        },
        _ => None,
    }
}

/// Operands of a chain of the same AND/OR, left to right, without recursion.
fn flatten<'e>(e: &'e Expr, op: &BinaryOperator) -> Vec<&'e Expr> {
    let mut out = Vec::new();
    let mut stack = vec![e];
    while let Some(x) = stack.pop() {
        match x {
            Expr::BinaryOp { left, op: o, right } if o == op => {
                stack.push(right);
                stack.push(left);
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sql: &str) -> SqlQuery {
        match parse(sql) {
            Ok(q) => q,
            Err(e) => panic!("{sql}\n{}", e.render(sql)),
        }
    }

    fn count() -> Aggregate {
        Aggregate {
            alias: "count".into(),
            kind: AggregateKind::Count,
            column: None,
        }
    }

    fn cmp(column: &str, op: CompareOp, value: Literal) -> Predicate {
        Predicate::Compare {
            column: column.into(),
            op,
            value,
        }
    }

    fn filter(where_clause: &str) -> Predicate {
        let sql = format!("SELECT COUNT(*) FROM gp_patients WHERE {where_clause}");
        ok(&sql).filter.unwrap()
    }

    #[test]
    fn count_star_with_default_alias() {
        let q = ok("SELECT COUNT(*) FROM gp_patients");
        assert_eq!(
            q,
            SqlQuery {
                dataset: "gp_patients".into(),
                filter: None,
                group_by: vec![],
                aggregates: vec![count()],
                linkage: None,
            }
        );
    }

    #[test]
    fn keys_aggregates_aliases_and_group_by_order() {
        let q = ok(
            "select sex, bin(age, 10), COUNT(*) AS n, SUM(bmi), AVG(hba1c) AS mean_hba1c, \
                    avg(bmi) FROM gp_patients GROUP BY bin(age, 10), sex;",
        );
        assert_eq!(
            q.group_by,
            vec![
                GroupKey::Bin {
                    column: "age".into(),
                    width: 10.0
                },
                GroupKey::Column("sex".into()),
            ]
        );
        let aliases: Vec<(&str, AggregateKind, Option<&str>)> = q
            .aggregates
            .iter()
            .map(|a| (a.alias.as_str(), a.kind, a.column.as_deref()))
            .collect();
        assert_eq!(
            aliases,
            vec![
                ("n", AggregateKind::Count, None),
                ("sum_bmi", AggregateKind::Sum, Some("bmi")),
                ("mean_hba1c", AggregateKind::Mean, Some("hba1c")),
                ("avg_bmi", AggregateKind::Mean, Some("bmi")),
            ]
        );
        assert_eq!(
            ok("SELECT bin(bmi, 2.5), COUNT(*) FROM gp_patients GROUP BY bin(bmi, 2.5)").group_by,
            vec![GroupKey::Bin {
                column: "bmi".into(),
                width: 2.5
            }]
        );
    }

    #[test]
    fn identifiers_fold_unless_quoted() {
        let q = ok("SELECT Sex, COUNT(*) FROM GP_Patients GROUP BY SEX");
        assert_eq!(q.dataset, "gp_patients");
        assert_eq!(q.group_by, vec![GroupKey::Column("sex".into())]);
        let q = ok("SELECT \"Sex\", COUNT(*) FROM gp_patients GROUP BY \"Sex\"");
        assert_eq!(q.group_by, vec![GroupKey::Column("Sex".into())]);
    }

    #[test]
    fn every_comparison_operator_and_literal() {
        use CompareOp::*;
        for (sql, op) in [
            ("=", Eq),
            ("<>", Ne),
            ("!=", Ne),
            ("<", Lt),
            ("<=", Le),
            (">", Gt),
            (">=", Ge),
        ] {
            assert_eq!(
                filter(&format!("age {sql} 40")),
                cmp("age", op, Literal::Integer(40))
            );
        }
        assert_eq!(filter("bmi > 30.5"), cmp("bmi", Gt, Literal::Real(30.5)));
        assert_eq!(filter("bmi > -3"), cmp("bmi", Gt, Literal::Integer(-3)));
        assert_eq!(filter("bmi > -2.5"), cmp("bmi", Gt, Literal::Real(-2.5)));
        assert_eq!(filter("bmi < 1e2"), cmp("bmi", Lt, Literal::Real(100.0)));
        assert_eq!(
            filter("sex = 'F'"),
            cmp("sex", Eq, Literal::Text("F".into()))
        );
        assert_eq!(
            filter("name = 'O''Brien'"),
            cmp("name", Eq, Literal::Text("O'Brien".into()))
        );
        assert_eq!(
            filter("diabetes = TRUE"),
            cmp("diabetes", Eq, Literal::Boolean(true))
        );
        assert_eq!(
            filter("diabetes = false"),
            cmp("diabetes", Eq, Literal::Boolean(false))
        );
        assert_eq!(
            filter("admission_date >= DATE '2026-04-01'"),
            cmp("admission_date", Ge, Literal::Text("2026-04-01".into()))
        );
        // A literal on the left is turned round.
        assert_eq!(filter("65 <= age"), cmp("age", Ge, Literal::Integer(65)));
    }

    #[test]
    fn in_between_null_and_boolean_logic() {
        assert_eq!(
            filter("imd_quintile IN (1, 2)"),
            Predicate::InList {
                column: "imd_quintile".into(),
                values: vec![Literal::Integer(1), Literal::Integer(2)],
                negated: false
            }
        );
        assert_eq!(
            filter("sex NOT IN ('U')"),
            Predicate::InList {
                column: "sex".into(),
                values: vec![Literal::Text("U".into())],
                negated: true
            }
        );
        assert_eq!(
            filter("age BETWEEN 40 AND 74"),
            Predicate::Between {
                column: "age".into(),
                low: Literal::Integer(40),
                high: Literal::Integer(74),
                negated: false
            }
        );
        assert_eq!(
            filter("age NOT BETWEEN 40 AND 74"),
            Predicate::Between {
                column: "age".into(),
                low: Literal::Integer(40),
                high: Literal::Integer(74),
                negated: true
            }
        );
        assert_eq!(
            filter("bmi IS NULL"),
            Predicate::IsNull {
                column: "bmi".into(),
                negated: false
            }
        );
        assert_eq!(
            filter("bmi IS NOT NULL"),
            Predicate::IsNull {
                column: "bmi".into(),
                negated: true
            }
        );
        // AND chains flatten; OR binds looser than AND; NOT and parentheses nest.
        assert_eq!(
            filter("age > 1 AND age < 9 AND sex = 'F' OR NOT (diabetes = TRUE)"),
            Predicate::Any(vec![
                Predicate::All(vec![
                    cmp("age", CompareOp::Gt, Literal::Integer(1)),
                    cmp("age", CompareOp::Lt, Literal::Integer(9)),
                    cmp("sex", CompareOp::Eq, Literal::Text("F".into())),
                ]),
                Predicate::Not(Box::new(cmp(
                    "diabetes",
                    CompareOp::Eq,
                    Literal::Boolean(true)
                ))),
            ])
        );
    }

    #[test]
    fn a_long_and_chain_stays_flat() {
        let conds: Vec<String> = (0..490).map(|i| format!("age <> {i}")).collect();
        match filter(&conds.join(" AND ")) {
            Predicate::All(parts) => assert_eq!(parts.len(), 490),
            other => panic!("{other:?}"),
        }
    }

    fn linkage(
        partner: &str,
        partner_filter: Option<Predicate>,
        negated: bool,
        min_partner_rows: u32,
    ) -> Option<Linkage> {
        Some(Linkage {
            partner_dataset: partner.into(),
            partner_filter,
            negated,
            min_partner_rows,
        })
    }

    fn text(s: &str) -> Literal {
        Literal::Text(s.into())
    }

    const DIABETES_EMERGENCIES: &str = "SELECT imd_quintile, COUNT(*) AS patients
FROM gp_patients g
WHERE g.diabetes = TRUE
  AND EXISTS (SELECT 1 FROM acute_admissions a
              WHERE a.person = g.person AND a.method = 'emergency'
                AND a.admission_date >= '2025-12-01')
GROUP BY imd_quintile";

    const FREQUENT_ATTENDERS: &str = "SELECT COUNT(*) AS clients FROM social_care_packages s
WHERE EXISTS (SELECT 1 FROM acute_admissions a WHERE a.person = s.person
              GROUP BY a.person HAVING COUNT(*) >= 4)";

    #[test]
    fn a_linked_question_with_filters_on_both_sides() {
        assert_eq!(
            ok(DIABETES_EMERGENCIES),
            SqlQuery {
                dataset: "gp_patients".into(),
                filter: Some(cmp("diabetes", CompareOp::Eq, Literal::Boolean(true))),
                group_by: vec![GroupKey::Column("imd_quintile".into())],
                aggregates: vec![Aggregate {
                    alias: "patients".into(),
                    kind: AggregateKind::Count,
                    column: None,
                }],
                linkage: linkage(
                    "acute_admissions",
                    Some(Predicate::All(vec![
                        cmp("method", CompareOp::Eq, text("emergency")),
                        cmp("admission_date", CompareOp::Ge, text("2025-12-01")),
                    ])),
                    false,
                    1,
                ),
            }
        );
    }

    #[test]
    fn frequent_attenders_count_partner_rows() {
        let q = ok(FREQUENT_ATTENDERS);
        assert_eq!(q.dataset, "social_care_packages");
        assert_eq!(q.filter, None);
        assert_eq!(q.linkage, linkage("acute_admissions", None, false, 4));
        let bounds = [("1", 1), ("100", 100)];
        for (k, rows) in bounds {
            let sql = FREQUENT_ATTENDERS.replace(">= 4", &format!(">= {k}"));
            assert_eq!(
                ok(&sql).linkage,
                linkage("acute_admissions", None, false, rows)
            );
        }
    }

    #[test]
    fn not_exists_and_exists_as_the_whole_where() {
        let inner = "(SELECT 1 FROM acute_admissions a WHERE a.person = g.person)";
        for (condition, negated) in [
            (format!("EXISTS {inner}"), false),
            (format!("NOT EXISTS {inner}"), true),
            (format!("NOT (EXISTS {inner})"), true),
            (format!("(EXISTS {inner})"), false),
        ] {
            let q = ok(&format!(
                "SELECT COUNT(*) FROM gp_patients g WHERE {condition}"
            ));
            assert_eq!(q.filter, None, "{condition}");
            assert_eq!(
                q.linkage,
                linkage("acute_admissions", None, negated, 1),
                "{condition}"
            );
        }
        let q = ok(&format!(
            "SELECT COUNT(*) FROM gp_patients g WHERE NOT EXISTS {inner} AND age >= 65"
        ));
        assert_eq!(
            q.filter,
            Some(cmp("age", CompareOp::Ge, Literal::Integer(65)))
        );
        assert_eq!(q.linkage, linkage("acute_admissions", None, true, 1));
    }

    #[test]
    fn the_correlation_reads_either_way_round_and_inner_columns_need_no_alias() {
        let expected = linkage(
            "acute_admissions",
            Some(cmp("method", CompareOp::Eq, text("emergency"))),
            false,
            1,
        );
        for inner in [
            "a.person = g.person AND a.method = 'emergency'",
            "g.person = a.person AND a.method = 'emergency'",
            "method = 'emergency' AND a.person = g.person",
            "(A.Person = G.Person) AND (method = 'emergency')",
        ] {
            let sql = format!(
                "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
                 (SELECT * FROM acute_admissions a WHERE {inner})"
            );
            assert_eq!(ok(&sql).linkage, expected, "{inner}");
        }
    }

    #[test]
    fn outer_conditions_around_exists_form_the_filter() {
        let q = ok("SELECT sex, COUNT(*) FROM gp_patients AS g \
                    WHERE age > 40 AND EXISTS (SELECT 1 FROM acute_admissions AS a \
                    WHERE a.person = g.person) AND (g.sex = 'F' OR bmi IS NULL) GROUP BY g.sex");
        assert_eq!(q.group_by, vec![GroupKey::Column("sex".into())]);
        assert_eq!(
            q.filter,
            Some(Predicate::All(vec![
                cmp("age", CompareOp::Gt, Literal::Integer(40)),
                Predicate::Any(vec![
                    cmp("sex", CompareOp::Eq, text("F")),
                    Predicate::IsNull {
                        column: "bmi".into(),
                        negated: false
                    },
                ]),
            ]))
        );
        assert_eq!(q.linkage, linkage("acute_admissions", None, false, 1));
    }

    #[test]
    fn an_alias_without_exists_is_harmless() {
        let plain = ok("SELECT sex, COUNT(*) FROM gp_patients WHERE age > 3 GROUP BY sex");
        let aliased = ok("SELECT g.sex, COUNT(*) FROM gp_patients g WHERE g.age > 3 GROUP BY sex");
        assert_eq!(aliased, plain);
        assert_eq!(aliased.linkage, None);
    }

    #[test]
    fn to_sql_of_a_parsed_query_parses_back_to_it() {
        for sql in [
            DIABETES_EMERGENCIES,
            FREQUENT_ATTENDERS,
            "SELECT COUNT(*) FROM gp_patients g WHERE NOT EXISTS (SELECT 1 FROM acute_admissions \
             x WHERE x.person = g.person AND (x.ward IN ('A', 'B') OR NOT x.los > 3))",
            "SELECT sex, bin(age, 10), COUNT(*) AS n, SUM(bmi) FROM gp_patients p WHERE \
             p.age BETWEEN 40 AND 74 AND p.bmi > 30.5 AND p.sex <> 'U' AND EXISTS (SELECT 1 \
             FROM social_care_packages s WHERE s.person = p.person AND s.hours IS NOT NULL \
             GROUP BY s.person HAVING COUNT(*) >= 2) GROUP BY sex, bin(age, 10)",
            "SELECT sex, AVG(bmi) AS mean_bmi FROM gp_patients WHERE age > 1 OR sex = 'F' \
             GROUP BY sex",
        ] {
            let parsed = ok(sql);
            let body = phm_proto::QueryBody {
                federation_id: "f".into(),
                query_id: "q".into(),
                requester_id: "r".into(),
                purpose: phm_proto::Purpose::Research,
                project_id: None,
                dataset: parsed.dataset.clone(),
                filter: parsed.filter.clone(),
                group_by: parsed.group_by.clone(),
                aggregates: parsed.aggregates.clone(),
                epsilon: 1.0,
                issued_at_unix_ms: 1,
                nonce: vec![0; 16],
                linkage: parsed.linkage.clone(),
                aggregation: Default::default(),
            };
            let rendered = body.to_sql();
            assert_eq!(ok(&rendered), parsed, "{sql}\n  rendered as\n{rendered}");
        }
    }

    #[test]
    fn a_large_linked_query_parses_and_errors_stay_in_bounds() {
        let values = vec!["'w'"; 400].join(", ");
        let sql = format!(
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person AND a.ward IN ({values}) GROUP BY a.person \
             HAVING COUNT(*) >= 3)"
        );
        assert!(sql.len() < MAX_SQL_LEN);
        let q = ok(&sql);
        assert!(matches!(
            q.linkage,
            Some(Linkage {
                min_partner_rows: 3,
                ..
            })
        ));
        for bad in [
            sql.replace(">= 3", ">= 0"),
            sql.replace("a.person = g.person", "a.age = g.age"),
            sql.replace("GROUP BY a.person ", ""),
            sql.replace("acute_admissions a", "acute_admissions g"),
            format!("{sql} OR EXISTS (SELECT 1 FROM x b WHERE b.person = g.person)"),
        ] {
            let e = parse(&bad).unwrap_err();
            assert!(e.offset + e.len <= bad.len(), "{e:?}");
            let _ = e.render(&bad);
        }
    }

    /// (sql, offending token, which occurrence of it (0-based), message fragment)
    const REFUSALS: &[(&str, &str, usize, &str)] = &[
        (
            "SELECT * FROM gp_patients",
            "*",
            0,
            "SELECT * is not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g JOIN acute_admissions a ON g.person_id = a.person_id",
            "JOIN",
            0,
            "joins are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients LEFT JOIN x ON 1 = 1",
            "LEFT",
            0,
            "joins are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients, acute_admissions",
            "acute_admissions",
            0,
            "only one dataset",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT * FROM gp_patients)",
            "SELECT",
            1,
            "subqueries are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age IN (SELECT 1)",
            "SELECT",
            1,
            "subqueries are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients ORDER BY 1",
            "ORDER",
            0,
            "ORDER BY is not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients LIMIT 10",
            "LIMIT",
            0,
            "LIMIT is not supported",
        ),
        (
            "SELECT sex, COUNT(*) FROM gp_patients GROUP BY sex HAVING COUNT(*) > 10",
            "HAVING",
            0,
            "HAVING is not supported",
        ),
        (
            "SELECT DISTINCT sex, COUNT(*) FROM gp_patients GROUP BY sex",
            "DISTINCT",
            0,
            "DISTINCT is not supported",
        ),
        (
            "SELECT COUNT(DISTINCT sex) FROM gp_patients",
            "DISTINCT",
            0,
            "DISTINCT is not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients UNION SELECT COUNT(*) FROM gp_patients",
            "UNION",
            0,
            "set operations",
        ),
        (
            "WITH t AS (SELECT 1) SELECT COUNT(*) FROM t",
            "WITH",
            0,
            "only SELECT queries are supported",
        ),
        (
            "SELECT COUNT(*) OVER () FROM gp_patients",
            "OVER",
            0,
            "window functions",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients; DROP TABLE gp_patients",
            "DROP",
            0,
            "only one statement",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients; SELECT 1",
            "SELECT",
            1,
            "only one statement",
        ),
        (
            "DELETE FROM gp_patients",
            "DELETE",
            0,
            "only SELECT queries are supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age = bmi",
            "bmi",
            0,
            "comparing two columns",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE 1 = 1",
            "1 = 1",
            0,
            "needs a column on one side",
        ),
        (
            "SELECT MAX(age) FROM gp_patients",
            "MAX",
            0,
            "function max() is not supported",
        ),
        (
            "SELECT COUNT(age) FROM gp_patients",
            "COUNT(age)",
            0,
            "only COUNT(*) is supported",
        ),
        (
            "SELECT SUM(age, bmi) FROM gp_patients",
            "SUM(age, bmi)",
            0,
            "takes 1 argument, got 2",
        ),
        ("SELECT SUM(age + 1) FROM gp_patients", "+", 0, "arithmetic"),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age - 1 > 3",
            "-",
            0,
            "arithmetic",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age > 3 * 2",
            "*",
            1,
            "arithmetic",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age::text = '3'",
            "::",
            0,
            "arithmetic",
        ),
        (
            "SELECT sex, COUNT(*) FROM gp_patients",
            "sex",
            0,
            "sex is selected but not in GROUP BY",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients GROUP BY sex",
            "sex",
            0,
            "sex is in GROUP BY but not selected",
        ),
        (
            "SELECT bin(age, 10), COUNT(*) FROM gp_patients GROUP BY bin(age, 5)",
            "bin(age, 10)",
            0,
            "bin(age, 10) is selected but not in GROUP BY",
        ),
        (
            "SELECT sex, sex, COUNT(*) FROM gp_patients GROUP BY sex, sex",
            "sex",
            3,
            "sex is grouped by twice",
        ),
        (
            "SELECT sex FROM gp_patients GROUP BY sex",
            "SELECT",
            0,
            "selects no aggregate",
        ),
        (
            "SELECT sex AS s, COUNT(*) FROM gp_patients GROUP BY sex",
            "s",
            1,
            "cannot be renamed",
        ),
        (
            "SELECT COUNT(*) AS n, SUM(bmi) AS n FROM gp_patients",
            "SUM(bmi)",
            0,
            "used for two aggregates",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE name LIKE 'a%'",
            "name LIKE 'a%'",
            0,
            "LIKE",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE diabetes",
            "diabetes",
            0,
            "alone is not a condition",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE diabetes IS TRUE",
            "diabetes",
            0,
            "IS TRUE",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age = NULL",
            "NULL",
            0,
            "NULL cannot be compared",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age > 99999999999999999999",
            "99999999999999999999",
            0,
            "out of range",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age + 1 > 3",
            "+",
            0,
            "arithmetic",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age = 1 = 2",
            "age = 1 = 2",
            0,
            "needs a column on one side",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE age > lower(x)",
            "lower(x)",
            0,
            "expected a literal",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients GROUP BY 1",
            "1",
            0,
            "by position",
        ),
        (
            "SELECT bin(age, 0), COUNT(*) FROM gp_patients GROUP BY bin(age, 0)",
            "bin(age, 0)",
            0,
            "bin width must be above 0",
        ),
        (
            "SELECT bin(age, 'x'), COUNT(*) FROM gp_patients GROUP BY bin(age, 'x')",
            "'x'",
            0,
            "bin width must be a number",
        ),
        (
            "SELECT COUNT(*) FROM public.gp_patients",
            "public.gp_patients",
            0,
            "qualified dataset name",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE x.age > 3",
            "x.age",
            0,
            "x is not the alias",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g (a, b)",
            "a",
            1,
            "a table alias can only name the dataset",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE g.age > 3",
            "g.age",
            0,
            "qualified column",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE CASE WHEN age > 1 THEN TRUE END",
            "CASE",
            0,
            "CASE",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE",
            "",
            0,
            "SQL syntax error",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE sex = 'F",
            "'",
            0,
            "SQL syntax error",
        ),
        (
            "SELECT COUNT(*) FORM gp_patients",
            "gp_patients",
            0,
            "SQL syntax error",
        ),
        (
            "SELECT 1 FROM gp_patients",
            "1",
            0,
            "constant cannot be selected",
        ),
        ("SELECT COUNT(*)", "SELECT", 0, "FROM dataset is missing"),
        ("   ", "", 0, "empty"),
    ];

    #[test]
    fn refusals_point_at_the_offending_token() {
        check_refusals(REFUSALS);
    }

    fn check_refusals(table: &[(&str, &str, usize, &str)]) {
        let mut failures = Vec::new();
        for (sql, token, nth, message) in table {
            let expected = if token.is_empty() {
                sql.len()
            } else {
                match sql.match_indices(token).nth(*nth) {
                    Some((i, _)) => i,
                    None => panic!("{sql}: no occurrence {nth} of {token:?}"),
                }
            };
            match parse(sql) {
                Ok(q) => failures.push(format!("{sql}: accepted as {q:?}")),
                Err(e) => {
                    let len_ok = token.is_empty()
                        || *token == "SELECT" && message.contains("no aggregate")
                        || *token == "SELECT" && message.contains("missing")
                        || e.len == token.len();
                    let offset_ok = e.offset == expected
                        || token.is_empty() && e.offset == 0 && message.contains("empty");
                    if !(e.message.contains(message) && offset_ok && len_ok && !e.hint.is_empty()) {
                        failures.push(format!(
                            "{sql}: expected {message:?} at {expected}+{}, got {:?} at {}+{}\n{}",
                            token.len(),
                            e.message,
                            e.offset,
                            e.len,
                            e.render(sql)
                        ));
                    }
                }
            }
        }
        assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    }

    /// Refusals of linked questions, in the style of `REFUSALS`.
    const LINK_REFUSALS: &[(&str, &str, usize, &str)] = &[
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person) AND EXISTS (SELECT 1 FROM social_care_packages s \
             WHERE s.person = g.person)",
            "EXISTS",
            1,
            "only one EXISTS",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person AND EXISTS (SELECT 1 FROM x b WHERE b.person = a.person))",
            "EXISTS",
            1,
            "only one EXISTS",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE g.age > 80 OR EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person)",
            "EXISTS",
            0,
            "EXISTS must be a condition of its own",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE NOT (g.age > 80 AND EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person))",
            "EXISTS",
            0,
            "EXISTS must be a condition of its own",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.method = 'emergency')",
            "EXISTS",
            0,
            "not correlated by a.person = g.person",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a)",
            "EXISTS",
            0,
            "not correlated by a.person = g.person",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.age = g.age)",
            "g.age",
            0,
            "only a.person = g.person may correlate",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.nhs_number)",
            "g.nhs_number",
            0,
            "only a.person = g.person may correlate",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person AND g.age > 3)",
            "g.age",
            0,
            "only a.person = g.person may correlate",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person OR a.los > 3)",
            "a.person = g.person",
            0,
            "must be a condition of its own",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person AND a.person = 'x')",
            "a.person",
            1,
            "person is not a column",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE person IS NOT NULL",
            "person",
            0,
            "person is not a column",
        ),
        (
            "SELECT person, COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person) GROUP BY person",
            "person",
            0,
            "person is not a column",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person) GROUP BY g.person",
            "g.person",
            1,
            "person is not a column",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE n.nhs_number = '9434765919'",
            "n.nhs_number",
            0,
            "n is not the alias",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = n.person)",
            "n.person",
            0,
            "n is not the alias",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.person HAVING COUNT(*) >= 0)",
            "0",
            0,
            "must be from 1 to 100",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.person HAVING COUNT(*) >= 101)",
            "101",
            0,
            "must be from 1 to 100",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.person HAVING COUNT(*) >= 2.5)",
            "2.5",
            0,
            "must be from 1 to 100",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.person HAVING COUNT(*) > 3)",
            "COUNT(*) > 3",
            0,
            "only HAVING COUNT(*) >= k",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person HAVING COUNT(*) >= 4)",
            "HAVING",
            0,
            "HAVING needs GROUP BY a.person",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.ward HAVING COUNT(*) >= 4)",
            "a.ward",
            0,
            "can group by a.person only",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person GROUP BY a.person)",
            "a.person",
            1,
            "needs HAVING COUNT(*) >= k",
        ),
        (
            "SELECT sex, COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM \
             acute_admissions a WHERE a.person = g.person) GROUP BY sex HAVING COUNT(*) > 1",
            "HAVING",
            0,
            "HAVING is not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             JOIN wards w ON a.ward = w.ward WHERE a.person = g.person)",
            "JOIN",
            0,
            "joins are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a, \
             wards w WHERE a.person = g.person)",
            "wards w",
            0,
            "only one dataset",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM acute_admissions a \
             WHERE a.person = g.person AND a.ward IN (SELECT 1))",
            "SELECT",
            2,
            "subqueries are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS (SELECT 1 FROM \
             (SELECT 1) a WHERE a.person = g.person)",
            "SELECT",
            2,
            "subqueries are not supported",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions g WHERE g.person = g.person)",
            "g",
            2,
            "already the outer dataset's",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions WHERE acute_admissions.person = g.person)",
            "acute_admissions",
            0,
            "needs an alias",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = gp_patients.person)",
            "gp_patients",
            0,
            "needs an alias for its dataset",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT a.ward FROM acute_admissions a WHERE a.person = g.person)",
            "a.ward",
            0,
            "must select 1",
        ),
        (
            "SELECT COUNT(*) FROM gp_patients g WHERE EXISTS \
             (SELECT 1 FROM acute_admissions a WHERE a.person = g.person ORDER BY a.ward)",
            "ORDER",
            0,
            "ORDER BY is not supported",
        ),
    ];

    #[test]
    fn linked_refusals_point_at_the_offending_token() {
        check_refusals(LINK_REFUSALS);
    }

    #[test]
    fn a_linked_refusal_renders_on_its_line() {
        let sql = DIABETES_EMERGENCIES.replace("a.person = g.person AND ", "");
        let r = parse(&sql).unwrap_err().render(&sql);
        assert!(
            r.contains("  --> line 4\n   |   AND EXISTS (SELECT 1 FROM acute_admissions a\n   |       ^^^^^^\n"),
            "{r}"
        );
        assert!(r.contains("hint: add a.person = g.person"), "{r}");
    }

    #[test]
    fn render_shows_the_line_a_caret_and_the_hint() {
        let sql = "SELECT COUNT(*)\nFROM gp_patients\nWHERE age = bmi";
        let e = parse(sql).unwrap_err();
        assert_eq!(
            e.render(sql),
            "error: comparing two columns is not supported\n  --> line 3\n   | WHERE age = bmi\n   \
             |             ^^^\nhint: compare a column with a literal value, e.g. age >= 65"
        );
        let sql = "SELECT * FROM gp_patients";
        let r = parse(sql).unwrap_err().render(sql);
        assert!(
            r.contains("   | SELECT * FROM gp_patients\n   |        ^\n"),
            "{r}"
        );
    }

    #[test]
    fn hostile_input_is_refused_without_panicking() {
        let deep = format!(
            "SELECT COUNT(*) FROM t WHERE {}age = 1{}",
            "(".repeat(500),
            ")".repeat(500)
        );
        assert!(parse(&deep).is_err());
        let nots = format!("SELECT COUNT(*) FROM t WHERE {}age = 1", "NOT ".repeat(200));
        assert!(parse(&nots).is_err());
        let long = format!(
            "SELECT COUNT(*) FROM t WHERE age IN ({})",
            vec!["1"; 3000].join(",")
        );
        assert!(parse(&long).is_err());
        assert!(parse(&"x".repeat(MAX_SQL_LEN + 1)).is_err());
        // Left-deep chains as long as the token limit allows, in every clause.
        let chain = vec!["age"; MAX_TOKENS / 2 - 10].join(" + ");
        for sql in [
            format!("SELECT {chain}, COUNT(*) FROM t GROUP BY age"),
            format!("SELECT SUM({chain}) FROM t"),
            format!("SELECT COUNT(*) FROM t WHERE {chain} > 1"),
            format!("SELECT COUNT(*) FROM t WHERE age > {chain}"),
            format!("SELECT COUNT(*) FROM t GROUP BY {chain}"),
            format!(
                "SELECT COUNT(*) FROM t WHERE age {}",
                vec!["= 1"; MAX_TOKENS / 2 - 10].join(" ")
            ),
            format!(
                "SELECT COUNT(*) FROM t WHERE age {}",
                vec!["IS NULL"; MAX_TOKENS / 2 - 10].join(" ")
            ),
            format!(
                "SELECT COUNT(*) FROM t WHERE {}age = 1",
                "NOT ".repeat(MAX_TOKENS - 10)
            ),
            format!(
                "SELECT COUNT(*) FROM t WHERE age IN {}1{}",
                "(".repeat(900),
                ")".repeat(900)
            ),
        ] {
            assert!(parse(&sql).is_err(), "{}", &sql[..60]);
        }
        // The longest OR chain the node limits allow is accepted, flat.
        let ors = vec!["age = 1"; 490].join(" OR ");
        match parse(&format!("SELECT COUNT(*) FROM t WHERE {ors}")).map(|q| q.filter) {
            Ok(Some(Predicate::Any(p))) => assert_eq!(p.len(), 490),
            other => panic!("{other:?}"),
        }
        for s in [
            "",
            ";",
            "SELECT",
            "SELECT COUNT(*) FROM t WHERE é = 'ü'",
            "SELECT \u{0}",
            "SELECT COUNT(*) FROM t WHERE age > 1e999",
        ] {
            let e = parse(s).unwrap_err();
            let _ = e.render(s);
        }
    }
}
