//! The analyst's SQL subset, parsed into phm.v1 query parts. Nodes never see SQL: the
//! client turns it into a structured query and signs that.
//!
//! Accepted: `SELECT` group keys and `COUNT(*)`, `SUM(col)`, `AVG(col)` (with `AS`
//! aliases), `FROM dataset`, a `WHERE` of comparisons with literals, `IN`, `BETWEEN`,
//! `IS [NOT] NULL`, `AND`/`OR`/`NOT`, and `GROUP BY` columns or `bin(col, width)`.
//! Everything else is refused with the offending token's position and a hint.

use phm_proto::query::{
    MAX_AGGREGATES, MAX_GROUP_KEYS, MAX_ID_LEN, MAX_PREDICATE_DEPTH, MAX_PREDICATE_NODES,
    MAX_TEXT_LITERAL_LEN,
};
use phm_proto::{Aggregate, AggregateKind, CompareOp, GroupKey, Literal, Predicate};
use sqlparser::ast::{
    BinaryOperator, DataType, Expr, FunctionArg, FunctionArgExpr, FunctionArguments, GroupByExpr,
    Ident, ObjectName, ObjectNamePart, Query, Select, SelectItem, SetExpr, Spanned, Statement,
    TableFactor, UnaryOperator, Value,
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
    let mut seen_select = false;
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
        let prev = out.last().map(|p| &p.token);
        let next = tokens.get(i + 1).map(|n| &n.token);
        if !operator_allowed(&t.token, prev, next) {
            return err(
                "arithmetic and operators other than comparisons are not supported",
                "compare a column with a literal, e.g. age >= 65 or sex IN ('F', 'M')",
            );
        }
        if let Some(k) = keyword(&t.token) {
            if out.is_empty() && k != Keyword::SELECT {
                return err("only SELECT queries are supported", FORM);
            }
            use Keyword as K;
            let refusal: Option<(&str, &str)> = match k {
                K::SELECT if seen_select => Some((
                    "subqueries are not supported",
                    "write one SELECT over one dataset; run separate queries and combine the answers",
                )),
                K::JOIN
                | K::INNER
                | K::LEFT
                | K::RIGHT
                | K::FULL
                | K::CROSS
                | K::NATURAL
                | K::OUTER
                | K::LATERAL => Some((
                    "joins are not supported",
                    "each query reads one dataset; nodes never link records across tables",
                )),
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
                K::HAVING => Some((
                    "HAVING is not supported",
                    "filter rows with WHERE; small cells are suppressed by the node's policy",
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
            };
            if let Some((m, h)) = refusal {
                return err(m, h);
            }
            if k == Keyword::SELECT {
                seen_select = true;
            }
        } else if out.is_empty() {
            return err("only SELECT queries are supported", FORM);
        }
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

struct Converter<'a, 'b> {
    pos: &'a Positions<'b>,
    /// Whether the query is small enough to compute node spans, which sqlparser does
    /// recursively over the whole subtree.
    small: bool,
    tokens: &'a [TokenWithSpan],
}

impl Converter<'_, '_> {
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
            SetExpr::Select(s) => self.select(s),
            SetExpr::Query(inner) => self.err(
                self.sp(inner.as_ref()),
                "a parenthesised query is not supported",
                "remove the outer parentheses",
            ),
            other => self.err(self.sp(other), "only a plain SELECT is supported", FORM),
        }
    }

    fn select(&self, s: &Select) -> Result<SqlQuery, SqlError> {
        let span = s.select_token.0.span;
        if s.distinct.is_some()
            || s.top.is_some()
            || s.into.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.having.is_some()
            || !s.named_window.is_empty()
            || s.qualify.is_some()
            || s.value_table_mode.is_some()
            || s.exclude.is_some()
        {
            return self.err(
                span,
                "this SELECT uses a clause that is not supported",
                FORM,
            );
        }
        let dataset = self.from(s)?;
        let mut keys: Vec<(GroupKey, Span)> = Vec::new();
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
                span,
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
        let group_by = self.group_by(&s.group_by)?;
        for (k, sp) in &keys {
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
        let filter = match &s.selection {
            None => None,
            Some(e) => {
                let mut nodes = 0;
                Some(self.predicate(e, 0, &mut nodes)?)
            }
        };
        Ok(SqlQuery {
            dataset,
            filter,
            group_by: group_by.into_iter().map(|(g, _)| g).collect(),
            aggregates: aggregates.into_iter().map(|(a, _)| a).collect(),
        })
    }

    fn from(&self, s: &Select) -> Result<String, SqlError> {
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
                "each query reads one dataset; nodes never link records across tables",
            );
        }
        if let Some(j) = first.joins.first() {
            return self.err(
                self.sp(j),
                "joins are not supported",
                "each query reads one dataset; nodes never link records across tables",
            );
        }
        match &first.relation {
            TableFactor::Table { name, alias, .. } => {
                if let Some(a) = alias {
                    return self.err(
                        a.span(),
                        "table aliases are not supported",
                        "write the dataset name alone",
                    );
                }
                // Any other decoration (arguments, hints, sampling) changes how the
                // relation prints; a bare name prints as itself.
                if first.relation.to_string() != name.to_string() {
                    return self.err(
                        self.sp(&first.relation),
                        "only a bare dataset name is supported after FROM",
                        "write FROM dataset, e.g. FROM gp_patients",
                    );
                }
                self.object_name(name, "dataset")
            }
            other => self.err(
                self.sp(other),
                "only a dataset name is supported after FROM (no subqueries or functions)",
                "write FROM dataset, e.g. FROM gp_patients",
            ),
        }
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
        let name = if ident.quote_style.is_some() {
            ident.value.clone()
        } else {
            ident.value.to_lowercase()
        };
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

    fn column(&self, e: &Expr) -> Result<String, SqlError> {
        match e {
            Expr::Identifier(i) => self.ident(i, "column"),
            Expr::CompoundIdentifier(_) => self.err(
                self.esp(e),
                "qualified column names are not supported",
                "write the column name alone",
            ),
            _ => self.err(self.esp(e), "expected a column name here", FORM),
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
            (true, true) => self.err(
                self.esp(right),
                "comparing two columns is not supported",
                "compare a column with a literal value, e.g. age >= 65",
            ),
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
            "SELECT COUNT(*) FROM gp_patients g",
            "g",
            1,
            "table aliases",
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
        let mut failures = Vec::new();
        for (sql, token, nth, message) in REFUSALS {
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
