//! XLSX workbooks: the usage report behind `GET /account/report` and the spreadsheet form of a
//! captured JSON payload behind `GET /account/data?data_flow_convert=XLSX`.
//!
//! This module owns the layout of those workbooks and Excel's limits (sheet names, cell text
//! length, rows and columns per sheet, series per chart): whatever it is handed, it returns a
//! workbook and says in the workbook what did not fit, rather than failing. Reading the
//! statistics and the captured payloads, validating the period, and the HTTP response (content
//! type, file name) are left to the `account` module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;

use chrono::NaiveDate;

/// The first date an Excel cell holds as a date (its 1900 date system; 1900-01-01 to
/// 1900-02-28 are off by one there, since Excel counts a 1900-02-29).
pub const FIRST_EXCEL_DATE: NaiveDate = match NaiveDate::from_ymd_opt(1900, 3, 1) {
    Some(date) => date,
    None => panic!("a valid date"),
};
use rust_xlsxwriter::{Chart, ChartType, ColNum, Format, RowNum, Workbook, Worksheet, XlsxError};
use serde_json::Value;

/// Excel's sheet has 1,048,576 rows; the header takes one.
const EXCEL_MAX_DATA_ROWS: u32 = 1_048_575;
const EXCEL_MAX_COLUMNS: ColNum = 16_384;
/// Excel counts cell text and sheet names in UTF-16 code units.
const EXCEL_MAX_CELL_UTF16_UNITS: usize = 32_767;
const EXCEL_MAX_SHEET_NAME_UTF16_UNITS: usize = 31;
/// Excel's limit of data series in one chart.
const EXCEL_MAX_CHART_SERIES: usize = 255;
/// Integers beyond 2^53 do not survive the trip through an f64, so they are kept as text.
const MAX_EXACT_INTEGER_IN_F64: u64 = 1 << 53;
const DATE_NUMBER_FORMAT: &str = "yyyy-mm-dd";

const DAILY_SHEET: &str = "Daily";
const TOTALS_SHEET: &str = "Totals";
const CHART_SHEET: &str = "Chart";
/// The chart sits at the top of its sheet; the table it plots starts below it.
const CHART_TABLE_FIRST_ROW: RowNum = 22;
const CHART_WIDTH_PIXELS: u32 = 960;
const CHART_HEIGHT_PIXELS: u32 = 420;
/// The autofilter's drop-down button covers the end of a header; this many characters of
/// width leave room for it.
const FILTER_BUTTON_WIDTH_CHARACTERS: usize = 3;
const MAX_DAILY_COLUMN_WIDTH_CHARACTERS: usize = 60;
/// Header row, then user, from and to, a blank row, then the totals table.
const TOTALS_TABLE_FIRST_ROW: RowNum = 4;

/// Autofit reads every cell it is given; a sample is enough for a column width.
const JSON_AUTOFIT_MAX_ROW: RowNum = 1_000;
const JSON_AUTOFIT_MAX_WIDTH_PIXELS: u32 = 400;

/// One day of one user's traffic to one method group of one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyRow {
    pub date: NaiveDate,
    pub service: String,
    pub method_group: String,
    pub points: u64,
    pub unique_points: u64,
}

/// The workbook could not be written; the text says which step failed.
#[derive(Debug)]
pub struct ReportError(String);

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "could not build the XLSX workbook: {}", self.0)
    }
}

impl std::error::Error for ReportError {}

impl From<XlsxError> for ReportError {
    fn from(error: XlsxError) -> Self {
        ReportError(error.to_string())
    }
}

/// How much fits in one sheet; tests shrink it to exercise the cuts without a million rows.
#[derive(Debug, Clone, Copy)]
struct SheetLimits {
    max_data_rows: u32,
    max_columns: ColNum,
    /// Sheets of a JSON workbook's arrays: one per top-level array, this many at most.
    max_array_sheets: usize,
}

const EXCEL_LIMITS: SheetLimits = SheetLimits {
    max_data_rows: EXCEL_MAX_DATA_ROWS,
    max_columns: EXCEL_MAX_COLUMNS,
    // Excel sets no number, but a workbook of thousands of sheets is no table anyone reads,
    // and each costs its building: a payload of 20,000 one-element arrays is 1 MiB.
    max_array_sheets: 250,
};

/// The usage report for one user and period.
///
/// Sheets: "Daily" (date, service, method_group, points, unique_points; bold header, real
/// dates shown as yyyy-mm-dd, autofilter, frozen header), "Totals" (user and period, then
/// points and unique points per service and method group over the period, then a grand total
/// row), and "Chart" (a stacked column chart of points per day per service, one series per
/// service, above the day-by-service table it plots). `rows` are written in the order given,
/// which the caller keeps sorted by date. With no rows the sheets hold their headers and the
/// chart sheet says there was no traffic.
pub fn statistics_workbook(
    username: &str,
    from: NaiveDate,
    to: NaiveDate,
    rows: &[DailyRow],
) -> Result<Vec<u8>, ReportError> {
    build_statistics_workbook(username, from, to, rows, EXCEL_LIMITS)
}

/// A JSON payload laid out as a workbook.
///
/// An object gives one sheet per array member (named after the member, made a valid and
/// unique sheet name) and puts its other members in a sheet "fields" (name, value). An array
/// gives one sheet "data"; a scalar gives a "fields" sheet with one row. In an array sheet each
/// element is a row and the columns are the keys of its object elements in first-seen order;
/// elements that are not objects go in a column "value" (shared with a key "value"). Numbers, booleans and strings become
/// cells of that type, null an empty cell, nested objects and arrays their JSON text; integers
/// too large for an f64 stay exact as text. What exceeds Excel's limits (cell text, rows,
/// columns) is cut, and a sheet "notes" lists every cut.
///
/// The member and key order is the order of the parsed map: insertion order when serde_json
/// keeps it (its `preserve_order` feature), alphabetical otherwise.
pub fn json_workbook(value: &Value) -> Result<Vec<u8>, ReportError> {
    build_json_workbook(value, EXCEL_LIMITS)
}

fn build_statistics_workbook(
    username: &str,
    from: NaiveDate,
    to: NaiveDate,
    rows: &[DailyRow],
    limits: SheetLimits,
) -> Result<Vec<u8>, ReportError> {
    let formats = Formats::new();
    let mut workbook = Workbook::new();

    let daily = workbook.add_worksheet().set_name(DAILY_SHEET)?;
    write_daily_sheet(daily, rows, limits, &formats)?;

    let totals = workbook.add_worksheet().set_name(TOTALS_SHEET)?;
    write_totals_sheet(totals, username, from, to, rows, &formats)?;

    let chart = workbook.add_worksheet().set_name(CHART_SHEET)?;
    write_chart_sheet(chart, from, to, rows, &formats)?;

    Ok(workbook.save_to_buffer()?)
}

struct Formats {
    bold: Format,
    date: Format,
    bold_date: Format,
}

impl Formats {
    fn new() -> Self {
        Formats {
            bold: Format::new().set_bold(),
            date: Format::new().set_num_format(DATE_NUMBER_FORMAT),
            bold_date: Format::new().set_bold().set_num_format(DATE_NUMBER_FORMAT),
        }
    }
}

fn write_daily_sheet(
    sheet: &mut Worksheet,
    rows: &[DailyRow],
    limits: SheetLimits,
    formats: &Formats,
) -> Result<(), XlsxError> {
    let header = ["date", "service", "method_group", "points", "unique_points"];
    sheet.write_row_with_format(0, 0, header, &formats.bold)?;
    let mut widths_characters = header.map(|name| name.chars().count());
    widths_characters[0] = widths_characters[0].max(DATE_NUMBER_FORMAT.len());
    let mut last_row: RowNum = 0;
    for (row, daily) in (1..=limits.max_data_rows).zip(rows) {
        let service = excel_text(&daily.service).0;
        let method_group = excel_text(&daily.method_group).0;
        sheet.write_date_with_format(row, 0, daily.date, &formats.date)?;
        sheet.write_string(row, 1, service)?;
        sheet.write_string(row, 2, method_group)?;
        sheet.write_number(row, 3, daily.points as f64)?;
        sheet.write_number(row, 4, daily.unique_points as f64)?;
        let cell_widths = [
            service.chars().count(),
            method_group.chars().count(),
            decimal_digits(daily.points),
            decimal_digits(daily.unique_points),
        ];
        for (width, cell_width) in widths_characters[1..].iter_mut().zip(cell_widths) {
            *width = (*width).max(cell_width);
        }
        last_row = row;
    }
    for (column, width) in (0..).zip(widths_characters) {
        let padded = width.min(MAX_DAILY_COLUMN_WIDTH_CHARACTERS) + FILTER_BUTTON_WIDTH_CHARACTERS;
        sheet.set_column_width(column, padded as f64)?;
    }
    sheet.autofilter(0, 0, last_row, 4)?;
    sheet.set_freeze_panes(1, 0)?;
    if rows.len() > limits.max_data_rows as usize {
        // Beside the table rather than in it, so the autofilter and sorting never move it.
        let note = format!(
            "Only the first {} of {} rows fit in one sheet; Totals count all of them.",
            limits.max_data_rows,
            rows.len()
        );
        sheet.write_string_with_format(0, 6, note, &formats.bold)?;
    }
    Ok(())
}

fn write_totals_sheet(
    sheet: &mut Worksheet,
    username: &str,
    from: NaiveDate,
    to: NaiveDate,
    rows: &[DailyRow],
    formats: &Formats,
) -> Result<(), XlsxError> {
    sheet.write_string_with_format(0, 0, "user", &formats.bold)?;
    sheet.write_string(0, 1, excel_text(username).0)?;
    sheet.write_string_with_format(1, 0, "from", &formats.bold)?;
    sheet.write_date_with_format(1, 1, from, &formats.date)?;
    sheet.write_string_with_format(2, 0, "to", &formats.bold)?;
    sheet.write_date_with_format(2, 1, to, &formats.date)?;

    let mut totals: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    for daily in rows {
        let entry = totals
            .entry((daily.service.as_str(), daily.method_group.as_str()))
            .or_default();
        entry.0 = entry.0.saturating_add(daily.points);
        entry.1 = entry.1.saturating_add(daily.unique_points);
    }

    let header = ["service", "method_group", "points", "unique_points"];
    sheet.write_row_with_format(TOTALS_TABLE_FIRST_ROW, 0, header, &formats.bold)?;
    let mut row = TOTALS_TABLE_FIRST_ROW;
    let (mut all_points, mut all_unique_points) = (0u64, 0u64);
    for ((service, method_group), (points, unique_points)) in &totals {
        row += 1;
        sheet.write_string(row, 0, excel_text(service).0)?;
        sheet.write_string(row, 1, excel_text(method_group).0)?;
        sheet.write_number(row, 2, *points as f64)?;
        sheet.write_number(row, 3, *unique_points as f64)?;
        all_points = all_points.saturating_add(*points);
        all_unique_points = all_unique_points.saturating_add(*unique_points);
    }
    row += 1;
    sheet.write_string_with_format(row, 0, "Total", &formats.bold)?;
    sheet.write_number_with_format(row, 2, all_points as f64, &formats.bold)?;
    sheet.write_number_with_format(row, 3, all_unique_points as f64, &formats.bold)?;
    sheet.autofit();
    Ok(())
}

fn write_chart_sheet(
    sheet: &mut Worksheet,
    from: NaiveDate,
    to: NaiveDate,
    rows: &[DailyRow],
    formats: &Formats,
) -> Result<(), XlsxError> {
    if rows.is_empty() {
        let message = format!("No traffic from {from} to {to}.");
        sheet.write_string_with_format(0, 0, message, &formats.bold)?;
        return Ok(());
    }

    let mut points_per_service: HashMap<&str, u64> = HashMap::new();
    for daily in rows {
        let total = points_per_service
            .entry(daily.service.as_str())
            .or_default();
        *total = total.saturating_add(daily.points);
    }
    let mut services: Vec<(&str, u64)> = points_per_service.into_iter().collect();
    let services_in_traffic = services.len();
    if services.len() > EXCEL_MAX_CHART_SERIES {
        // The busiest services are the ones a reader looks for in the chart.
        services.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        services.truncate(EXCEL_MAX_CHART_SERIES);
    }
    services.sort_by(|a, b| a.0.cmp(b.0));
    let column_of_service: HashMap<&str, usize> = services
        .iter()
        .enumerate()
        .map(|(index, (service, _))| (*service, index))
        .collect();

    let mut points_per_day: BTreeMap<NaiveDate, Vec<u64>> = BTreeMap::new();
    for daily in rows {
        if let Some(&column) = column_of_service.get(daily.service.as_str()) {
            let day = points_per_day
                .entry(daily.date)
                .or_insert_with(|| vec![0; services.len()]);
            day[column] = day[column].saturating_add(daily.points);
        }
    }

    let header_row = CHART_TABLE_FIRST_ROW;
    sheet.write_string_with_format(header_row, 0, "date", &formats.bold)?;
    for (column, (service, _)) in (1..).zip(&services) {
        sheet.write_string_with_format(header_row, column, excel_text(service).0, &formats.bold)?;
    }
    let max_days = (EXCEL_MAX_DATA_ROWS - CHART_TABLE_FIRST_ROW) as usize;
    let mut last_row = header_row;
    for (row, (date, points)) in (header_row + 1..).zip(points_per_day.iter().take(max_days)) {
        sheet.write_date_with_format(row, 0, *date, &formats.bold_date)?;
        for (column, points) in (1..).zip(points) {
            sheet.write_number(row, column, *points as f64)?;
        }
        last_row = row;
    }
    sheet.autofit();

    let mut chart = Chart::new(ChartType::ColumnStacked);
    chart.title().set_name("Points per day by service");
    chart
        .x_axis()
        .set_date_axis(true)
        .set_num_format(DATE_NUMBER_FORMAT);
    chart.y_axis().set_name("points");
    chart
        .set_width(CHART_WIDTH_PIXELS)
        .set_height(CHART_HEIGHT_PIXELS);
    for column in (1..).take(services.len()) {
        chart
            .add_series()
            .set_name((CHART_SHEET, header_row, column))
            .set_categories((CHART_SHEET, header_row + 1, 0, last_row, 0))
            .set_values((CHART_SHEET, header_row + 1, column, last_row, column));
    }
    sheet.insert_chart(0, 0, &chart)?;

    if services_in_traffic > services.len() || points_per_day.len() > max_days {
        let note = format!(
            "The chart shows {} of {} services (the busiest) and {} of {} days; Totals count \
             them all.",
            services.len(),
            services_in_traffic,
            points_per_day.len().min(max_days),
            points_per_day.len()
        );
        sheet.write_string_with_format(header_row - 1, 0, note, &formats.bold)?;
    }
    Ok(())
}

fn decimal_digits(number: u64) -> usize {
    number.checked_ilog10().map_or(1, |log| log as usize + 1)
}

/// Text as Excel can hold it, and whether it had to be cut.
fn excel_text(text: &str) -> (&str, bool) {
    let kept = prefix_within_utf16_units(text, EXCEL_MAX_CELL_UTF16_UNITS);
    (kept, kept.len() < text.len())
}

/// The longest prefix of `text` that is at most `max_units` UTF-16 code units long, never
/// splitting a character.
fn prefix_within_utf16_units(text: &str, max_units: usize) -> &str {
    let mut units = 0;
    for (byte_index, character) in text.char_indices() {
        units += character.len_utf16();
        if units > max_units {
            return &text[..byte_index];
        }
    }
    text
}

/// Hands out sheet names that Excel accepts and that differ from every name given before,
/// compared without case as Excel does.
struct SheetNames {
    taken_lowercase: HashSet<String>,
    /// Per base name (lowercase) given copies, the copy number to try next: many names cut
    /// to the same 31 characters are numbered in one pass, not each from " (2)" again.
    next_copy: HashMap<String, u32>,
}

impl SheetNames {
    fn new() -> Self {
        // Excel reserves "History" for its change tracking.
        SheetNames {
            taken_lowercase: HashSet::from(["history".to_string()]),
            next_copy: HashMap::new(),
        }
    }

    fn claim(&mut self, wanted: &str) -> String {
        let replaced: String = wanted
            .chars()
            .map(|c| {
                if "[]:*?/\\".contains(c) || c.is_control() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let shortened = prefix_within_utf16_units(&replaced, EXCEL_MAX_SHEET_NAME_UTF16_UNITS);
        let base = match shortened.trim_matches('\'') {
            "" => "sheet",
            trimmed => trimmed,
        };
        let mut candidate = base.to_string();
        let base_key = base.to_lowercase();
        let copy_number = self.next_copy.entry(base_key).or_insert(2);
        while self.taken_lowercase.contains(&candidate.to_lowercase()) {
            let suffix = format!(" ({copy_number})");
            let room = EXCEL_MAX_SHEET_NAME_UTF16_UNITS - suffix.len();
            candidate = format!("{}{suffix}", prefix_within_utf16_units(base, room));
            *copy_number += 1;
        }
        self.taken_lowercase.insert(candidate.to_lowercase());
        candidate
    }
}

/// What one sheet lost to Excel's limits.
#[derive(Debug, Default)]
struct Cuts {
    rows_total: usize,
    rows_dropped: usize,
    columns_dropped: usize,
    cells_shortened: usize,
}

impl Cuts {
    fn notes(&self, limits: SheetLimits) -> Vec<String> {
        let mut notes = Vec::new();
        if self.rows_dropped > 0 {
            notes.push(format!(
                "only the first {} of {} rows fit in a sheet; the rest were left out",
                self.rows_total - self.rows_dropped,
                self.rows_total
            ));
        }
        if self.columns_dropped > 0 {
            notes.push(format!(
                "columns left out past the limit of {}: {}",
                limits.max_columns, self.columns_dropped
            ));
        }
        if self.cells_shortened > 0 {
            notes.push(format!(
                "cells cut to {} characters: {}",
                EXCEL_MAX_CELL_UTF16_UNITS, self.cells_shortened
            ));
        }
        notes
    }
}

fn build_json_workbook(value: &Value, limits: SheetLimits) -> Result<Vec<u8>, ReportError> {
    let bold = Format::new().set_bold();
    let mut workbook = Workbook::new();
    let mut names = SheetNames::new();
    let mut notes: Vec<(String, String)> = Vec::new();
    let mut record = |sheet_name: String, cuts: Cuts| {
        for note in cuts.notes(limits) {
            notes.push((sheet_name.clone(), note));
        }
    };

    match value {
        Value::Object(members) => {
            let has_arrays = members.values().any(Value::is_array);
            let fields: Vec<(&str, &Value)> = members
                .iter()
                .filter(|(_, member)| !member.is_array())
                .map(|(name, member)| (name.as_str(), member))
                .collect();
            // An empty object still needs one sheet to be a workbook.
            if !fields.is_empty() || !has_arrays {
                let name = names.claim("fields");
                let sheet = workbook.add_worksheet().set_name(&name)?;
                record(name, write_fields_sheet(sheet, &fields, limits, &bold)?);
            }
            let arrays = members.iter().filter_map(|(name, member)| match member {
                Value::Array(elements) => Some((name, elements)),
                _ => None,
            });
            let mut left_out = 0usize;
            for (index, (member_name, elements)) in arrays.enumerate() {
                if index >= limits.max_array_sheets {
                    left_out += 1;
                    continue;
                }
                let name = names.claim(member_name);
                let sheet = workbook.add_worksheet().set_name(&name)?;
                record(name, write_array_sheet(sheet, elements, limits, &bold)?);
            }
            if left_out > 0 {
                notes.push((
                    "(workbook)".to_string(),
                    format!(
                        "only the first {} arrays have a sheet; {left_out} more were left out",
                        limits.max_array_sheets
                    ),
                ));
            }
        }
        Value::Array(elements) => {
            let name = names.claim("data");
            let sheet = workbook.add_worksheet().set_name(&name)?;
            record(name, write_array_sheet(sheet, elements, limits, &bold)?);
        }
        scalar => {
            let name = names.claim("fields");
            let sheet = workbook.add_worksheet().set_name(&name)?;
            record(
                name,
                write_fields_sheet(sheet, &[("value", scalar)], limits, &bold)?,
            );
        }
    }

    if !notes.is_empty() {
        let name = names.claim("notes");
        let sheet = workbook.add_worksheet().set_name(&name)?;
        sheet.write_row_with_format(0, 0, ["sheet", "note"], &bold)?;
        for (row, (sheet_name, note)) in (1..).zip(&notes) {
            sheet.write_string(row, 0, sheet_name)?;
            sheet.write_string(row, 1, note)?;
        }
        sheet.autofit();
    }
    Ok(workbook.save_to_buffer()?)
}

fn write_fields_sheet(
    sheet: &mut Worksheet,
    fields: &[(&str, &Value)],
    limits: SheetLimits,
    bold: &Format,
) -> Result<Cuts, XlsxError> {
    let mut cuts = Cuts {
        rows_total: fields.len(),
        rows_dropped: fields.len().saturating_sub(limits.max_data_rows as usize),
        ..Cuts::default()
    };
    sheet.write_row_with_format(0, 0, ["name", "value"], bold)?;
    for (row, (name, value)) in (1..=limits.max_data_rows).zip(fields) {
        write_text(sheet, row, 0, name, &mut cuts)?;
        write_json_cell(sheet, row, 1, value, &mut cuts)?;
    }
    fit_json_columns(sheet);
    Ok(cuts)
}

fn write_array_sheet<'a>(
    sheet: &mut Worksheet,
    elements: &'a [Value],
    limits: SheetLimits,
    bold: &Format,
) -> Result<Cuts, XlsxError> {
    let kept = &elements[..elements.len().min(limits.max_data_rows as usize)];
    let mut cuts = Cuts {
        rows_total: elements.len(),
        rows_dropped: elements.len() - kept.len(),
        ..Cuts::default()
    };

    let mut headers: Vec<&'a str> = Vec::new();
    let mut column_of: HashMap<&'a str, ColNum> = HashMap::new();
    let mut dropped_keys: HashSet<&'a str> = HashSet::new();
    let mut add_column = |key: &'a str| {
        if column_of.contains_key(key) || dropped_keys.contains(key) {
            return;
        }
        match ColNum::try_from(headers.len()) {
            Ok(column) if column < limits.max_columns => {
                headers.push(key);
                column_of.insert(key, column);
            }
            _ => {
                dropped_keys.insert(key);
            }
        }
    };
    for element in kept {
        match element {
            Value::Object(fields) => fields.keys().for_each(|key| add_column(key)),
            _ => add_column("value"),
        }
    }
    cuts.columns_dropped = dropped_keys.len();

    for (column, header) in (0..).zip(&headers) {
        let (text, shortened) = excel_text(header);
        sheet.write_string_with_format(0, column, text, bold)?;
        cuts.cells_shortened += usize::from(shortened);
    }
    for (row, element) in (1..).zip(kept) {
        match element {
            Value::Object(fields) => {
                for (key, value) in fields {
                    if let Some(&column) = column_of.get(key.as_str()) {
                        write_json_cell(sheet, row, column, value, &mut cuts)?;
                    }
                }
            }
            scalar => {
                if let Some(&column) = column_of.get("value") {
                    write_json_cell(sheet, row, column, scalar, &mut cuts)?;
                }
            }
        }
    }
    if !headers.is_empty() {
        sheet.set_freeze_panes(1, 0)?;
    }
    fit_json_columns(sheet);
    Ok(cuts)
}

fn fit_json_columns(sheet: &mut Worksheet) {
    sheet
        .set_autofit_max_row(JSON_AUTOFIT_MAX_ROW)
        .set_autofit_max_width(JSON_AUTOFIT_MAX_WIDTH_PIXELS)
        .autofit();
}

fn write_json_cell(
    sheet: &mut Worksheet,
    row: RowNum,
    column: ColNum,
    value: &Value,
    cuts: &mut Cuts,
) -> Result<(), XlsxError> {
    match value {
        Value::Null => {}
        Value::Bool(flag) => {
            sheet.write_boolean(row, column, *flag)?;
        }
        Value::Number(number) => {
            let exact_in_f64 = match (number.as_u64(), number.as_i64()) {
                (Some(unsigned), _) => unsigned <= MAX_EXACT_INTEGER_IN_F64,
                (None, Some(signed)) => signed.unsigned_abs() <= MAX_EXACT_INTEGER_IN_F64,
                (None, None) => true,
            };
            match number.as_f64() {
                Some(float) if exact_in_f64 => {
                    sheet.write_number(row, column, float)?;
                }
                _ => write_text(sheet, row, column, &number.to_string(), cuts)?,
            }
        }
        Value::String(text) => write_text(sheet, row, column, text, cuts)?,
        Value::Array(_) | Value::Object(_) => {
            write_text(sheet, row, column, &value.to_string(), cuts)?
        }
    }
    Ok(())
}

fn write_text(
    sheet: &mut Worksheet,
    row: RowNum,
    column: ColNum,
    text: &str,
    cuts: &mut Cuts,
) -> Result<(), XlsxError> {
    let (kept, shortened) = excel_text(text);
    cuts.cells_shortened += usize::from(shortened);
    sheet.write_string(row, column, kept)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use calamine::{open_workbook_from_rs, Data, Reader, Xlsx};
    use serde_json::json;
    use std::io::Cursor;

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").expect("test dates are valid")
    }

    fn daily(day: &str, service: &str, method_group: &str, points: u64, unique: u64) -> DailyRow {
        DailyRow {
            date: date(day),
            service: service.to_string(),
            method_group: method_group.to_string(),
            points,
            unique_points: unique,
        }
    }

    struct Opened {
        workbook: Xlsx<Cursor<Vec<u8>>>,
        bytes: Vec<u8>,
    }

    impl Opened {
        fn new(bytes: Vec<u8>) -> Self {
            let workbook = open_workbook_from_rs(Cursor::new(bytes.clone()))
                .expect("the workbook opens with calamine");
            Opened { workbook, bytes }
        }

        fn sheet_names(&self) -> Vec<String> {
            self.workbook.sheet_names()
        }

        fn rows(&mut self, sheet: &str) -> Vec<Vec<Data>> {
            let range = self
                .workbook
                .worksheet_range(sheet)
                .expect("the sheet exists");
            // calamine trims leading empty rows and columns; put them back so indexes match
            // the sheet's own.
            let (first_row, first_column) = range.start().unwrap_or((0, 0));
            let width = range.width() + first_column as usize;
            let mut rows = vec![vec![Data::Empty; width]; first_row as usize];
            for row in range.rows() {
                let mut full = vec![Data::Empty; first_column as usize];
                full.extend(row.iter().cloned());
                rows.push(full);
            }
            rows
        }

        /// Zip entry names are stored uncompressed, so a part's presence shows in the bytes.
        fn has_part(&self, part_name: &str) -> bool {
            self.bytes
                .windows(part_name.len())
                .any(|window| window == part_name.as_bytes())
        }
    }

    fn text(value: &str) -> Data {
        Data::String(value.to_string())
    }

    fn excel_serial(day: &str) -> f64 {
        (date(day) - date("1899-12-30")).num_days() as f64
    }

    fn assert_date_cell(cell: &Data, day: &str) {
        match cell {
            Data::DateTime(stamp) => assert_eq!(stamp.as_f64(), excel_serial(day), "{day}"),
            other => panic!("expected the date {day} as a date cell, found {other:?}"),
        }
    }

    fn sample_rows() -> Vec<DailyRow> {
        vec![
            daily("2024-02-01", "ocr", "recognize", 10, 4),
            daily("2024-02-01", "translate", "text", 7, 7),
            daily("2024-02-03", "ocr", "recognize", 5, 2),
            daily("2024-02-03", "ocr", "layout", 1, 1),
            daily("2024-02-04", "translate", "text", 3, 3),
        ]
    }

    #[test]
    fn daily_sheet_has_header_rows_and_real_dates() {
        let rows = sample_rows();
        let bytes = statistics_workbook("alice", date("2024-02-01"), date("2024-02-29"), &rows)
            .expect("report builds");
        let mut opened = Opened::new(bytes);
        assert_eq!(opened.sheet_names(), ["Daily", "Totals", "Chart"]);
        let daily_rows = opened.rows("Daily");
        assert_eq!(
            daily_rows[0],
            [
                text("date"),
                text("service"),
                text("method_group"),
                text("points"),
                text("unique_points")
            ]
        );
        assert_eq!(daily_rows.len(), rows.len() + 1);
        for (sheet_row, expected) in daily_rows[1..].iter().zip(&rows) {
            assert_date_cell(&sheet_row[0], &expected.date.to_string());
            assert_eq!(sheet_row[1], text(&expected.service));
            assert_eq!(sheet_row[2], text(&expected.method_group));
            assert_eq!(sheet_row[3], Data::Float(expected.points as f64));
            assert_eq!(sheet_row[4], Data::Float(expected.unique_points as f64));
        }
    }

    #[test]
    fn totals_sum_per_service_and_method_group_with_a_grand_total() {
        let bytes = statistics_workbook(
            "alice",
            date("2024-02-01"),
            date("2024-02-29"),
            &sample_rows(),
        )
        .expect("report builds");
        let mut opened = Opened::new(bytes);
        let totals = opened.rows("Totals");
        assert_eq!(totals[0][..2], [text("user"), text("alice")]);
        assert_date_cell(&totals[1][1], "2024-02-01");
        assert_date_cell(&totals[2][1], "2024-02-29");
        let table: Vec<Vec<Data>> = totals[TOTALS_TABLE_FIRST_ROW as usize..].to_vec();
        let expected = [
            [
                text("service"),
                text("method_group"),
                text("points"),
                text("unique_points"),
            ],
            [
                text("ocr"),
                text("layout"),
                Data::Float(1.0),
                Data::Float(1.0),
            ],
            [
                text("ocr"),
                text("recognize"),
                Data::Float(15.0),
                Data::Float(6.0),
            ],
            [
                text("translate"),
                text("text"),
                Data::Float(10.0),
                Data::Float(10.0),
            ],
            [
                text("Total"),
                Data::Empty,
                Data::Float(26.0),
                Data::Float(17.0),
            ],
        ];
        assert_eq!(table, expected);
    }

    #[test]
    fn chart_sheet_plots_points_per_day_per_service() {
        let bytes = statistics_workbook(
            "alice",
            date("2024-02-01"),
            date("2024-02-29"),
            &sample_rows(),
        )
        .expect("report builds");
        let mut opened = Opened::new(bytes);
        assert!(opened.has_part("xl/charts/chart1.xml"));
        let chart_rows = opened.rows("Chart");
        let table = &chart_rows[CHART_TABLE_FIRST_ROW as usize..];
        assert_eq!(table[0], [text("date"), text("ocr"), text("translate")]);
        let expected_days = [
            ("2024-02-01", 10.0, 7.0),
            ("2024-02-03", 6.0, 0.0),
            ("2024-02-04", 0.0, 3.0),
        ];
        assert_eq!(table.len(), expected_days.len() + 1);
        for (row, (day, ocr, translate)) in table[1..].iter().zip(expected_days) {
            assert_date_cell(&row[0], day);
            assert_eq!(row[1..], [Data::Float(ocr), Data::Float(translate)]);
        }
    }

    #[test]
    fn an_empty_period_gives_headers_zero_totals_and_no_chart() {
        let bytes = statistics_workbook("bob", date("2024-03-01"), date("2024-03-31"), &[])
            .expect("an empty report builds");
        let mut opened = Opened::new(bytes);
        assert!(!opened.has_part("xl/charts/chart1.xml"));
        assert_eq!(opened.rows("Daily").len(), 1);
        let totals = opened.rows("Totals");
        let table = &totals[TOTALS_TABLE_FIRST_ROW as usize..];
        assert_eq!(table.len(), 2);
        assert_eq!(
            table[1],
            [
                text("Total"),
                Data::Empty,
                Data::Float(0.0),
                Data::Float(0.0)
            ]
        );
        assert_eq!(
            opened.rows("Chart")[0][0],
            text("No traffic from 2024-03-01 to 2024-03-31.")
        );
    }

    #[test]
    fn the_chart_keeps_the_busiest_services_within_excels_series_limit() {
        let service_count = EXCEL_MAX_CHART_SERIES + 3;
        let rows: Vec<DailyRow> = (0..service_count)
            .map(|index| {
                daily(
                    "2024-02-01",
                    &format!("service{index:03}"),
                    "m",
                    index as u64 + 1,
                    1,
                )
            })
            .collect();
        let bytes = statistics_workbook("alice", date("2024-02-01"), date("2024-02-01"), &rows)
            .expect("report builds");
        let mut opened = Opened::new(bytes);
        let chart_rows = opened.rows("Chart");
        let header = &chart_rows[CHART_TABLE_FIRST_ROW as usize];
        assert_eq!(header.len(), EXCEL_MAX_CHART_SERIES + 1);
        // The three quietest services are the ones left out.
        assert_eq!(header[1], text("service003"));
        let note = &chart_rows[CHART_TABLE_FIRST_ROW as usize - 1][0];
        assert!(
            matches!(note, Data::String(s) if s.contains("255 of 258 services")),
            "{note:?}"
        );
    }

    #[test]
    fn daily_rows_past_the_sheet_limit_are_cut_with_a_note_and_still_totalled() {
        let limits = SheetLimits {
            max_data_rows: 3,
            ..EXCEL_LIMITS
        };
        let rows = sample_rows();
        let bytes = build_statistics_workbook(
            "alice",
            date("2024-02-01"),
            date("2024-02-29"),
            &rows,
            limits,
        )
        .expect("report builds");
        let mut opened = Opened::new(bytes);
        let daily_rows = opened.rows("Daily");
        assert_eq!(daily_rows.len(), 4);
        assert_eq!(
            daily_rows[0][6],
            text("Only the first 3 of 5 rows fit in one sheet; Totals count all of them.")
        );
        let totals = opened.rows("Totals");
        let grand_total = totals.last().expect("totals has rows");
        assert_eq!(grand_total[2], Data::Float(26.0));
    }

    #[test]
    fn sheets_and_columns_follow_the_documents_member_order() {
        let payload: Value = serde_json::from_str(
            r#"{"zeta":[1],"title":"t","alpha":[2],"mid":[{"b":1,"a":2},{"c":3,"a":4}]}"#,
        )
        .unwrap();
        let mut opened = Opened::new(json_workbook(&payload).expect("workbook builds"));
        assert_eq!(opened.sheet_names(), ["fields", "zeta", "alpha", "mid"]);
        assert_eq!(
            opened.rows("mid")[0],
            [text("b"), text("a"), text("c")],
            "columns in the order the members first come"
        );
    }

    #[test]
    fn json_object_gives_a_fields_sheet_and_one_sheet_per_array() {
        let payload = json!({
            "count": 2,
            "items": [
                {"id": 1, "name": "a", "ok": true},
                {"extra": {"k": [1, 2]}, "id": 2, "name": null},
                "loose",
                [3, 4]
            ],
            "title": "scan"
        });
        let bytes = json_workbook(&payload).expect("workbook builds");
        let mut opened = Opened::new(bytes);
        assert_eq!(opened.sheet_names(), ["fields", "items"]);
        let fields = opened.rows("fields");
        let mut field_rows = fields[1..].to_vec();
        field_rows.sort_by_key(|row| format!("{:?}", row[0]));
        assert_eq!(fields[0], [text("name"), text("value")]);
        assert_eq!(
            field_rows,
            [
                vec![text("count"), Data::Float(2.0)],
                vec![text("title"), text("scan")]
            ]
        );
        let items = opened.rows("items");
        assert_eq!(
            items,
            [
                vec![
                    text("id"),
                    text("name"),
                    text("ok"),
                    text("extra"),
                    text("value")
                ],
                vec![
                    Data::Float(1.0),
                    text("a"),
                    Data::Bool(true),
                    Data::Empty,
                    Data::Empty
                ],
                vec![
                    Data::Float(2.0),
                    Data::Empty,
                    Data::Empty,
                    text(r#"{"k":[1,2]}"#),
                    Data::Empty
                ],
                vec![
                    Data::Empty,
                    Data::Empty,
                    Data::Empty,
                    Data::Empty,
                    text("loose")
                ],
                vec![
                    Data::Empty,
                    Data::Empty,
                    Data::Empty,
                    Data::Empty,
                    text("[3,4]")
                ],
            ]
        );
    }

    #[test]
    fn sheet_names_follow_excels_rules_and_stay_unique() {
        let long_name = "x".repeat(40);
        let payload = json!({
            "a/b": [1],
            "a:b": [2],
            "A_B": [3],
            "fields": [4],
            "History": [5],
            "'quoted'": [6],
            "[]": [7],
            long_name.clone(): [8],
            "version": "1"
        });
        let bytes = json_workbook(&payload).expect("workbook builds");
        let opened = Opened::new(bytes);
        let names = opened.sheet_names();
        assert_eq!(names.len(), 9);
        let unique: HashSet<String> = names.iter().map(|name| name.to_lowercase()).collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for name in &names {
            assert!(name.encode_utf16().count() <= 31, "{name}");
            assert!(
                !name.contains(['[', ']', ':', '*', '?', '/', '\\']),
                "{name}"
            );
            assert!(!name.starts_with('\'') && !name.ends_with('\''), "{name}");
            assert!(!name.eq_ignore_ascii_case("history"), "{name}");
        }
        assert_eq!(names[0], "fields");
        assert!(names.contains(&"fields (2)".to_string()), "{names:?}");
        assert!(names.contains(&"History (2)".to_string()), "{names:?}");
        assert!(names.contains(&"quoted".to_string()), "{names:?}");
        assert!(names.contains(&"__".to_string()), "{names:?}");
        assert!(names.contains(&"x".repeat(31)), "{names:?}");
        let a_b_family = names
            .iter()
            .filter(|name| name.starts_with("a_b") || name.starts_with("A_B"));
        assert_eq!(a_b_family.count(), 3, "{names:?}");
    }

    #[test]
    fn decimal_digits_count_every_digit() {
        assert_eq!(decimal_digits(0), 1);
        assert_eq!(decimal_digits(9), 1);
        assert_eq!(decimal_digits(10), 2);
        assert_eq!(decimal_digits(10_000_000), 8);
        assert_eq!(decimal_digits(u64::MAX), 20);
    }

    #[test]
    fn sheet_name_suffixes_fit_and_never_split_a_character() {
        let mut names = SheetNames::new();
        let emoji_name = "\u{1F600}".repeat(20);
        let first = names.claim(&emoji_name);
        assert_eq!(first, "\u{1F600}".repeat(15));
        let second = names.claim(&emoji_name);
        assert_eq!(second, format!("{} (2)", "\u{1F600}".repeat(13)));
        assert_eq!(names.claim(""), "sheet");
        assert_eq!(names.claim("'"), "sheet (2)");
        assert_eq!(names.claim("tab\there"), "tab_here");
    }

    #[test]
    fn top_level_array_scalar_and_empty_values_still_give_a_workbook() {
        let mut opened = Opened::new(json_workbook(&json!([1, "two", null])).expect("array"));
        assert_eq!(opened.sheet_names(), ["data"]);
        assert_eq!(
            opened.rows("data"),
            [
                vec![text("value")],
                vec![Data::Float(1.0)],
                vec![text("two")],
            ]
        );

        let mut opened = Opened::new(json_workbook(&json!(42.5)).expect("scalar"));
        assert_eq!(opened.sheet_names(), ["fields"]);
        assert_eq!(
            opened.rows("fields"),
            [
                vec![text("name"), text("value")],
                vec![text("value"), Data::Float(42.5)]
            ]
        );

        let mut opened = Opened::new(json_workbook(&json!({})).expect("empty object"));
        assert_eq!(opened.sheet_names(), ["fields"]);
        assert_eq!(opened.rows("fields"), [vec![text("name"), text("value")]]);

        let mut opened = Opened::new(json_workbook(&json!({"rows": []})).expect("empty array"));
        assert_eq!(opened.sheet_names(), ["rows"]);
        assert!(opened.rows("rows").is_empty());

        let opened = Opened::new(json_workbook(&json!(null)).expect("null"));
        assert_eq!(opened.sheet_names(), ["fields"]);
    }

    #[test]
    fn overlong_text_is_cut_and_noted() {
        let long_text = "\u{e9}".repeat(EXCEL_MAX_CELL_UTF16_UNITS + 10);
        let payload = json!({"items": [{"text": long_text, "control": "a\u{1}b"}]});
        let mut opened = Opened::new(json_workbook(&payload).expect("workbook builds"));
        assert_eq!(opened.sheet_names(), ["items", "notes"]);
        let items = opened.rows("items");
        let column_of = |name: &str| {
            items[0]
                .iter()
                .position(|cell| *cell == text(name))
                .expect("column exists")
        };
        match &items[1][column_of("text")] {
            Data::String(kept) => {
                assert_eq!(kept.chars().count(), EXCEL_MAX_CELL_UTF16_UNITS)
            }
            other => panic!("expected text, found {other:?}"),
        }
        assert_eq!(items[1][column_of("control")], text("a\u{1}b"));
        assert_eq!(
            opened.rows("notes"),
            [
                vec![text("sheet"), text("note")],
                vec![text("items"), text("cells cut to 32767 characters: 1")]
            ]
        );
    }

    #[test]
    fn rows_and_columns_past_the_limits_are_cut_and_noted() {
        let limits = SheetLimits {
            max_data_rows: 2,
            max_columns: 2,
            ..EXCEL_LIMITS
        };
        let payload = json!({"notes": [
            {"a": 1, "b": 2},
            {"c": 3},
            {"d": 4}
        ]});
        let bytes = build_json_workbook(&payload, limits).expect("workbook builds");
        let mut opened = Opened::new(bytes);
        assert_eq!(opened.sheet_names(), ["notes", "notes (2)"]);
        assert_eq!(
            opened.rows("notes"),
            [
                vec![text("a"), text("b")],
                vec![Data::Float(1.0), Data::Float(2.0)],
            ]
        );
        assert_eq!(
            opened.rows("notes (2)"),
            [
                vec![text("sheet"), text("note")],
                vec![
                    text("notes"),
                    text("only the first 2 of 3 rows fit in a sheet; the rest were left out")
                ],
                vec![
                    text("notes"),
                    text("columns left out past the limit of 2: 1")
                ],
            ]
        );
    }

    #[test]
    fn arrays_past_the_sheet_limit_are_left_out_with_a_note_and_names_stay_distinct() {
        // Names alike in their first 31 characters, as a caller can send thousands of: each
        // gets its own copy number, and the workbook stops at the sheet limit.
        let members: serde_json::Map<String, Value> = (0..12_000)
            .map(|i| (format!("{}{i:06}", "a".repeat(31)), json!([i])))
            .collect();
        let bytes = json_workbook(&Value::Object(members)).expect("workbook builds");
        let mut opened = Opened::new(bytes);
        let names = opened.sheet_names();
        assert_eq!(names.len(), EXCEL_LIMITS.max_array_sheets + 1, "{names:?}");
        let distinct: HashSet<String> = names.iter().map(|n| n.to_lowercase()).collect();
        assert_eq!(distinct.len(), names.len());
        assert_eq!(names[1], format!("{} (2)", "a".repeat(27)));
        let notes = opened.rows(names.last().unwrap());
        assert_eq!(
            notes[1][1],
            text("only the first 250 arrays have a sheet; 11750 more were left out")
        );
    }

    #[test]
    fn integers_too_large_for_a_float_stay_exact_as_text() {
        let payload = json!([{"small": 9_007_199_254_740_992u64, "large": 9_007_199_254_740_993u64, "negative": -12_345_678_901_234_567i64}]);
        let mut opened = Opened::new(json_workbook(&payload).expect("workbook builds"));
        let data = opened.rows("data");
        let cell = |name: &str| {
            let column = data[0]
                .iter()
                .position(|cell| *cell == text(name))
                .expect("column exists");
            data[1][column].clone()
        };
        assert_eq!(cell("small"), Data::Float(9_007_199_254_740_992.0));
        assert_eq!(cell("large"), text("9007199254740993"));
        assert_eq!(cell("negative"), text("-12345678901234567"));
    }
}
