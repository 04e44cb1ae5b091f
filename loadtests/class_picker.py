"""The web UI's class picker starts with the chosen scenario's user classes ticked alone.

Locust's React form initialises its selection from every available class (``useState(availableUserClasses)``) and
takes no template argument for it, so a small script in the page unticks, once, at the first render of the
picker, every class not named in ``template_args["loadlab_selected_user_classes"]``: each row's checkbox cell is
clicked as a user would, one per render, so the form's own state holds the selection. Every scenario stays selectable.
"""
from __future__ import annotations

TEMPLATE_ARG = "loadlab_selected_user_classes"

SCRIPT = """<script>
(function () {
  var chosen = (window.templateArgs || {})[%(arg)s] || [];
  var done = false;
  function rows() {
    var label = Array.prototype.find.call(document.querySelectorAll("label"),
      function (l) { return l.textContent === "User Classes"; });
    var table = label && label.parentElement.querySelector("table");
    return table ? Array.prototype.slice.call(table.querySelectorAll("tbody tr")) : [];
  }
  // one click per render: React has not re-rendered between two clicks of one loop, and each click's handler
  // would start from the same selection
  function untickNext(clicksLeft) {
    var wrong = rows().filter(function (row) {
      var box = row.querySelector("input[type=checkbox]");
      var name = row.children[1] && row.children[1].textContent;
      return box && box.checked !== (chosen.indexOf(name) >= 0);
    });
    if (!wrong.length || clicksLeft <= 0) return;
    wrong[0].children[0].click();
    setTimeout(function () { untickNext(clicksLeft - 1); }, 0);
  }
  function pick() {
    if (done) return;
    var found = rows();
    if (!found.length) return;
    done = true;
    observer.disconnect();
    untickNext(2 * found.length);
  }
  var observer = new MutationObserver(pick);
  observer.observe(document.documentElement, {childList: true, subtree: true});
  pick();
})();
</script>""" % {"arg": '"' + TEMPLATE_ARG + '"'}


def tick_only(web_ui, class_names: list[str]) -> None:
    """The picker of ``web_ui`` (Locust's ``WebUI``) starts with ``class_names`` ticked and the others not."""
    from flask import request

    web_ui.template_args[TEMPLATE_ARG] = sorted(class_names)

    @web_ui.app.after_request
    def add_picker_script(response):
        if request.path != "/" or response.status_code != 200 or response.mimetype != "text/html":
            return response
        page = response.get_data(as_text=True)
        if "</body>" in page:
            response.set_data(page.replace("</body>", SCRIPT + "\n</body>", 1))
        return response
