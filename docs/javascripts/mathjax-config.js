// MathJax 3 settings for pymdownx.arithmatex (generic mode): \( ... \) inline, \[ ... \] display.
// Loaded before docs/javascripts/mathjax/tex-svg.js (MathJax 3.2.2, Apache-2.0, shipped here so
// that the site renders its formulas offline).
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};
document$.subscribe(() => {
  if (window.MathJax && MathJax.typesetPromise) {
    MathJax.startup.output.clearCache();
    MathJax.typesetClear();
    MathJax.texReset();
    MathJax.typesetPromise();
  }
});
