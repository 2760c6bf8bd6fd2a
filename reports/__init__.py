"""lmaudit's reports: the self-contained HTML report and the JSON results, from plain records (no torch here).

Modules
-------
- ``records``       :class:`~lmaudit.reports.records.AuditRecord` (one audit item) and :class:`~lmaudit.reports.records.RunInfo`
- ``html``          :func:`~lmaudit.reports.html.render_html` / :func:`~lmaudit.reports.html.write_html_report`
- ``json_results``  the versioned JSON results (README "JSON results") and :func:`~lmaudit.reports.json_results.load_results`
- ``sections``      the generic rendering of a result dict
- ``charts``        the chart registry; ``charts.common`` has the chart helpers
- ``atomic``        every file is written to a temporary file, then renamed

Adding your area's evidence without editing these files
-------------------------------------------------------
Each audit row carries ``result_type`` (the ``__name__`` of the check's result dataclass, or of the object a
Python audit passed to the ``audit_evidence`` fixture) and ``result`` (that object as plain JSON-able data:
dataclasses become dicts, tuples lists, tensors and numpy arrays lists, enums their values, NaN/inf strings).
Its section in the report is, in this order:

1. the comparison table (metric, expected, measured, pass/fail) and all metrics;
2. the **section partial** ``reports/templates/sections/<ResultType>.html.j2`` when that file exists, else the
   **generic view** of ``result`` (scalars as a key/value table, lists of flat dicts as tables, long lists and
   strings truncated with a note). A partial is rendered with ``record`` (the AuditRecord) and ``result`` (the
   dict) and may ``{% import "sections/_macros.html.j2" as lm %}`` for ``lm.render(value | generic)``,
   ``lm.table(rows, columns=None, limit=50)`` and ``lm.kv(mapping)``; filter ``fmt`` formats numbers.
   Autoescaping is on: never mark model text ``|safe``. A partial that raises falls back to the generic view;
3. every **chart** registered for that result type. Put a module in ``reports/charts/`` (any name not starting
   with ``_``; every module there is imported through pkgutil on first render)::

       from lmaudit.reports.charts import chart_for
       from lmaudit.reports.charts.common import bar_chart, heatmap, line_chart, scatter

       @chart_for("SuperWeightDirectory")            # one or more result class names
       def evidence(result: dict) -> list[tuple[str, str]]:
           maxima = result["layer_maxima"]
           return [("Max |down_proj input| per layer",
                    bar_chart(list(range(len(maxima))), maxima, xlabel="layer", log_y=True))]

   A chart function returns ``(title, svg)`` pairs. Build the SVG with the helpers of
   :mod:`lmaudit.reports.charts.common` (``bar_chart``, ``line_chart`` with ``log_x``, ``heatmap``, ``scatter`` with
   labels, or ``figure_to_svg`` for your own ``matplotlib.figure.Figure``): they use the Agg backend and keep
   text as escaped SVG ``<text>``. Every SVG goes through :func:`lmaudit.reports.charts.inline_svg` (prologue,
   metadata, comments and ``<style>`` stripped; script, event handlers, foreignObject and any reference outside
   the document rejected). A chart function that raises or returns unsafe SVG shows its error in place.

Areas (the ``area=`` of ``register_check``, or ``@pytest.mark.audit_area("bias")`` on a Python audit) order the
sections: model, superweights, quantization, arithmetic, bias, other.
"""
