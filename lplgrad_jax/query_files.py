"""The human oracle's query files, in WORKDIR/queries/, and their checks.

  round_<N>.csv  id,file,score,label: one row per queried image, best score
                 first, the label column blank for the person to fill in
  round_<N>.png  a contact sheet: a thumbnail of each queried image captioned
                 with its id, under a header listing the valid labels
where N is the 1-based number of the round whose query it is. The person
writes a class name (or "skip" for an unusable image) in every row and reruns
the campaign command; `read_labels` checks the whole file before anything is
used, so a typo costs one rerun and never a half-applied round. The labeling
page (`label`) writes the same files; neither imports JAX through this module.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import os
import textwrap

import numpy as np

from lplgrad_jax import reporting
from lplgrad_jax.errors import ConfigError
from lplgrad_jax.utils import ceil_div

SKIP = "skip"  # the label for an image that is unusable or fits no class
QUERIES_DIR = "queries"
COLUMNS = ("id", "file", "score", "label")

THUMB = 96  # thumbnail side on the contact sheet, pixels
PAD = 8  # space around thumbnails
CAPTION = 14  # height of the id line under a thumbnail
COLUMNS_PER_ROW = 10
_MAX_LISTED = 20  # ids named in one line about missing rows


class LabelFileError(ConfigError):
  """All the problems of a filled-in query file: a summary line, then one line per problem.

  Each problem line names the file (and the line, where there is one), so it
  reads on its own when the command line prints the lines separately.
  """

  multi_line = True

  def __init__(self, path: str, problems: list[str]):
    self.path = path
    self.problems = list(problems)
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    super().__init__("\n".join([f"{path}: {count} in the labels; fix and rerun", *problems]))


def query_csv_path(workdir: str, round_number: int) -> str:
  """The query file of round `round_number` (1-based, the round whose model chose the images)."""
  return os.path.join(workdir, QUERIES_DIR, f"round_{round_number}.csv")


def contact_sheet_path(workdir: str, round_number: int) -> str:
  return os.path.join(workdir, QUERIES_DIR, f"round_{round_number}.png")


def write_query(
  workdir: str, round_number: int, ids, files, scores, images, class_names
) -> tuple[str, str]:
  """Writes the query file and its contact sheet; returns (csv path, png path).

  `ids`, `files` (original file of each image), `scores` (None: the strategy
  has none) and `images` (uint8 HWC, the model-size copies, shown where an
  original cannot be read) are aligned, in the order the rows should appear.
  Both files are replaced atomically, so a crash never leaves a half-written
  query for the person to fill in.
  """
  scores = [None] * len(ids) if scores is None else list(scores)
  if not len(ids) == len(files) == len(scores) == len(images):
    raise ValueError(
      f"write_query: {len(ids)} ids, {len(files)} files, {len(scores)} scores "
      f"and {len(images)} images: expected one of each per queried image"
    )
  csv_path = query_csv_path(workdir, round_number)
  png_path = contact_sheet_path(workdir, round_number)
  reporting.write_csv(
    csv_path,
    COLUMNS,
    [
      [int(i), file, "" if score is None else f"{float(score):.6g}", ""]
      for i, file, score in zip(ids, files, scores)
    ],
  )
  header = (
    f"round {round_number}: write a label for each id in the label column of "
    f"{os.path.basename(csv_path)}. Labels: {', '.join([*class_names, SKIP])}"
  )
  sheet = _contact_sheet([int(i) for i in ids], files, images, header)
  reporting.write_atomic(png_path, lambda f: sheet.save(f, format="PNG"), mode="wb")
  return csv_path, png_path


def _delimiter(text: str) -> str:
  """Whichever of `,` `;` or tab a query file's header uses (spreadsheet exports vary)."""
  first_line = text.splitlines()[0] if text.strip() else ""
  return max(",;\t", key=first_line.count)


def _table(text: str):
  """(lower-cased header cells, csv reader over the rows after it) of a query file's text."""
  reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text))
  return [cell.strip().lower() for cell in next(reader, [])], reader


@dataclasses.dataclass(frozen=True)
class QueryRow:
  id: int
  file: str
  label: str  # as written, stripped; "" while unanswered


def _read_text(csv_path: str) -> str:
  try:
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
      return f.read()
  except FileNotFoundError:
    raise ConfigError(
      f"query file {csv_path} is missing: expected the file the campaign "
      "wrote when it stopped for labels"
    ) from None
  except UnicodeDecodeError:
    raise ConfigError(f"{csv_path} is not UTF-8 text: save it as CSV (UTF-8)") from None


def _columns(csv_path: str, header: list[str]) -> tuple[int, int]:
  absent = [column for column in ("id", "label") if column not in header]
  if absent:
    raise ConfigError(
      f"{os.path.basename(csv_path)} line 1: no {' and no '.join(absent)} "
      f"column: expected the header {','.join(COLUMNS)}"
    )
  return header.index("id"), header.index("label")


def query_rows(csv_path: str) -> list[QueryRow]:
  """The rows of a query file with an integer id, in file order, labels as written so far."""
  header, reader = _table(_read_text(csv_path))
  id_column, label_column = _columns(csv_path, header)
  file_column = header.index("file") if "file" in header else None
  rows = []
  for row in reader:
    row = row + [""] * (len(header) - len(row))
    if row[id_column].strip().isdigit():
      file = row[file_column].strip() if file_column is not None else ""
      rows.append(QueryRow(int(row[id_column]), file, row[label_column].strip()))
  return rows


def set_label(csv_path: str, image_id: int, label: str, file: str = "") -> None:
  """Writes `label` ("" clears it) into the row of `image_id`, keeping everything else.

  The file is re-read first, so answers written meanwhile (another tab, a
  spreadsheet) stay; its separator, line ends, byte-order mark and columns are
  kept. A row the person deleted is appended again (with `file`). The caller
  serializes concurrent calls and validates `label`.
  """
  with open(csv_path, "rb") as f:
    raw = f.read()
  bom = raw.startswith(codecs.BOM_UTF8)
  text = _read_text(csv_path)
  delimiter = _delimiter(text)
  rows = list(csv.reader(io.StringIO(text, newline=""), delimiter=delimiter))
  header = [cell.strip().lower() for cell in rows[0]]
  id_column, label_column = _columns(csv_path, header)
  found = False
  for k, row in enumerate(rows[1:], start=1):
    if len(row) > id_column and row[id_column].strip() == str(image_id):
      rows[k] = row + [""] * (len(header) - len(row))
      rows[k][label_column] = label
      found = True
  if not found:
    values = {"id": str(image_id), "file": file, "label": label}
    rows.append([values.get(column, "") for column in header])
  out = io.StringIO()
  csv.writer(out, delimiter=delimiter, lineterminator="\r\n" if "\r\n" in text else "\n").writerows(
    rows
  )
  data = (codecs.BOM_UTF8 if bom else b"") + out.getvalue().encode("utf-8")
  reporting.write_atomic(csv_path, lambda f: f.write(data), mode="wb")


def filled_ids(csv_path: str) -> set[int] | None:
  """The ids of a query file that already has labels written in, None if it has none.

  A query is written again when a campaign repeats it (after --restart, or a
  checkpoint lost before the query's was saved): the person's labels must not
  be wiped by a blank copy.
  """
  try:
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
      text = f.read()
  except FileNotFoundError:
    return None
  except (OSError, UnicodeDecodeError):
    return set()  # unreadable: it may hold someone's work, so it is not overwritten
  header, reader = _table(text)
  if "id" not in header or "label" not in header:
    return set()
  ids, filled = set(), False
  for row in reader:
    row = row + [""] * (len(header) - len(row))
    filled |= bool(row[header.index("label")].strip())
    if row[header.index("id")].strip().isdigit():
      ids.add(int(row[header.index("id")]))
  return ids if filled else None


def _thumbnail(path: str, image: np.ndarray):
  """A THUMB-sized view of one image, from its original file when that is still readable.

  The original is far more legible than the model-size copy (often 32x32);
  images smaller than THUMB are enlarged with NEAREST, so pixels stay crisp.
  """
  from PIL import Image
  from PIL import ImageOps

  try:
    with Image.open(path) as im:
      im.thumbnail((THUMB, THUMB))  # shrinks only; decodes JPEGs at a reduced scale
      im = im.convert("RGB")
  except (OSError, SyntaxError, Image.DecompressionBombError):
    im = Image.fromarray(np.asarray(image, np.uint8))
  return ImageOps.contain(im, (THUMB, THUMB), Image.NEAREST)


def _contact_sheet(ids: list[int], files, images, header: str):
  """A grid of captioned thumbnails, COLUMNS_PER_ROW wide, under a wrapped header."""
  from PIL import Image
  from PIL import ImageDraw
  from PIL import ImageFont

  font = ImageFont.load_default()
  columns = max(1, min(COLUMNS_PER_ROW, len(ids)))
  rows = ceil_div(len(ids), columns)
  width = PAD + columns * (THUMB + PAD)
  measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
  char_width = measure.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26
  lines = textwrap.wrap(header, max(20, int((width - 2 * PAD) / char_width)))
  top = PAD + len(lines) * CAPTION + PAD
  sheet = Image.new("RGB", (width, top + rows * (THUMB + CAPTION + PAD)), "white")
  draw = ImageDraw.Draw(sheet)
  for k, line in enumerate(lines):
    draw.text((PAD, PAD + k * CAPTION), line, fill="black", font=font)
  for k, (i, file, image) in enumerate(zip(ids, files, images)):
    x = PAD + (k % columns) * (THUMB + PAD)
    y = top + (k // columns) * (THUMB + CAPTION + PAD)
    thumb = _thumbnail(file, image)
    draw.rectangle((x - 1, y - 1, x + THUMB, y + THUMB), outline=(190, 190, 190))  # white images
    sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
    caption = str(i)
    draw.text(
      (x + (THUMB - draw.textlength(caption, font=font)) / 2, y + THUMB + 1),
      caption,
      fill="black",
      font=font,
    )
  return sheet


def _class_index(label: str, class_names) -> int | None:
  """The class a filled-in label names, None for skip; KeyError if it names none.

  A class name matches exactly, else ignoring case where that singles out one
  class. Class indices are not accepted: with numbered class folders ("1",
  "2", ...) an index and a name would read the same and mean different classes.
  """
  if label in class_names:
    return class_names.index(label)
  folded = [k for k, name in enumerate(class_names) if name.casefold() == label.casefold()]
  if len(folded) == 1:
    return folded[0]
  if label.casefold() == SKIP:
    return None
  raise KeyError(label)


def foreign_id_problem(image_id: int, expected_ids) -> str | None:
  """Why `image_id` cannot be answered in this query, None if it can (both label routes)."""
  if image_id not in expected_ids:
    return f"id {image_id} is not one of this query's images"
  return None


def unknown_label_problem(image_id: int, label: str, class_names) -> str | None:
  """Why `label` is no answer for `image_id`, None if it is one (both label routes)."""
  try:
    _class_index(label, list(class_names))
  except KeyError:
    return (
      f"unknown label {label!r} for id {image_id}: expected one of "
      f"{', '.join([*class_names, SKIP])}"
    )
  return None


def canonical_label(label: str, class_names) -> str:
  """The class name (or SKIP) a valid filled-in label stands for; KeyError if it names none."""
  index = _class_index(label, list(class_names))
  return SKIP if index is None else class_names[index]


def read_labels(csv_path: str, expected_ids, class_names) -> dict[int, int | None]:
  """The labels of a filled-in query file: {id: class index, or None for skip}.

  Returns a label for every id of `expected_ids` or raises LabelFileError
  listing every problem (unknown or blank labels, ids repeated, foreign, not
  integers, or missing), so one pass of fixes suffices. Tolerates what
  spreadsheet programs do to a CSV: a UTF-8 byte-order mark, CRLF line ends,
  ";" or tab as the separator, extra columns, reordered columns, blank lines.
  """
  name = os.path.basename(csv_path)
  class_names = list(class_names)
  valid = ", ".join([*class_names, SKIP])
  try:
    with open(csv_path, encoding="utf-8-sig", newline="") as f:
      text = f.read()
  except FileNotFoundError:
    raise ConfigError(
      f"label file {csv_path} is missing: expected this round's query file "
      f"with its label column filled in ({valid})"
    ) from None
  except UnicodeDecodeError:
    raise ConfigError(f"{csv_path} is not UTF-8 text: save it as CSV (UTF-8)") from None
  header, reader = _table(text)
  absent = [column for column in ("id", "label") if column not in header]
  if absent:
    raise LabelFileError(
      csv_path,
      [
        f"{name} line 1: no {' and no '.join(absent)} column: "
        f"expected the header {','.join(COLUMNS)}"
      ],
    )
  id_column, label_column = header.index("id"), header.index("label")
  expected = {int(i) for i in expected_ids}
  labels, seen_on, problems = {}, {}, []
  for row in reader:
    line = reader.line_num
    if not any(cell.strip() for cell in row):
      continue
    row = row + [""] * (len(header) - len(row))
    raw_id, label = row[id_column].strip(), row[label_column].strip()
    try:
      image_id = int(raw_id)
    except ValueError:
      problems.append(
        f"{name} line {line}: id {raw_id!r} is not an integer: expected an id of this query"
      )
      continue
    if (problem := foreign_id_problem(image_id, expected)) is not None:
      problems.append(f"{name} line {line}: {problem}")
      continue
    if image_id in seen_on:
      problems.append(
        f"{name} line {line}: id {image_id} is listed again (first on line {seen_on[image_id]})"
      )
      continue
    seen_on[image_id] = line
    if not label:
      problems.append(f"{name} line {line}: blank label for id {image_id}: expected one of {valid}")
      continue
    try:
      labels[image_id] = _class_index(label, class_names)
    except KeyError:
      problems.append(f"{name} line {line}: {unknown_label_problem(image_id, label, class_names)}")
  missing = [int(i) for i in expected_ids if int(i) not in seen_on]
  if missing:
    listed = ", ".join(str(i) for i in missing[:_MAX_LISTED])
    more = f" and {len(missing) - _MAX_LISTED} more" if len(missing) > _MAX_LISTED else ""
    problems.append(
      f"{name}: {len(missing)} id{'s' if len(missing) > 1 else ''} of this query "
      f"missing from the file ({listed}{more}): put their rows back"
    )
  if problems:
    raise LabelFileError(csv_path, problems)
  return labels
