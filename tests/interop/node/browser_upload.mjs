// Uppy (Dashboard + Tus) in headless Debian Chromium, driven by playwright-core; run as its
// own process by tests/interop/test_uppy_browser.py.
//
//   node browser_upload.mjs --page URL --file PATH --screenshot PATH --chromium PATH
//                           --user-data-dir DIR [--timeout-ms N]
//
// Opens the page (served by the test on loopback, its configuration in the URL fragment),
// picks the file through the Dashboard's file input, clicks Upload, waits for Uppy's
// `complete` event, and takes a screenshot. Prints one JSON line: done (what the page
// recorded), browser (its version), console (the page's console and errors), offLoopback
// (requests to any host but 127.0.0.1: there must be none). Exit code 0 when Uppy reported
// one successful upload, 3 otherwise, 4 on a timeout.
import { parseArgs } from 'node:util'

import { chromium } from 'playwright-core'

// What Chromium needs on this closed network (no sandbox as root, no GPU, no background
// connections; no proxy: loopback only); playwright-core adds --headless, and the profile
// is the new empty directory the test made (launchPersistentContext).
const CHROMIUM_FLAGS = [
  '--no-proxy-server',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
]
const INTERRUPTED = 3
const TIMED_OUT = 4

const { values: args } = parseArgs({
  options: {
    page: { type: 'string' },
    file: { type: 'string' },
    screenshot: { type: 'string' },
    chromium: { type: 'string', default: '/usr/bin/chromium' },
    'user-data-dir': { type: 'string' },
    'timeout-ms': { type: 'string', default: '45000' },
  },
})
for (const name of ['page', 'file', 'screenshot', 'user-data-dir']) {
  if (!args[name]) {
    console.error(`missing --${name}`)
    process.exit(2)
  }
}
const timeoutMs = Number(args['timeout-ms'])
const report = { done: null, browser: null, console: [], offLoopback: [], error: null }
let context = null
let finishing = false

// Once: close Chromium, print the report, exit.
async function finish(code) {
  if (finishing) return
  finishing = true
  await context?.close().catch(() => {})
  console.log(JSON.stringify(report))
  process.exit(code)
}

// The test stops this process with SIGTERM on its own timeout: close Chromium first.
process.on('SIGTERM', () => {
  report.error = 'stopped by SIGTERM'
  finish(TIMED_OUT)
})
setTimeout(() => {
  report.error = `no result within ${timeoutMs} ms`
  finish(TIMED_OUT)
}, timeoutMs).unref()

try {
  context = await chromium.launchPersistentContext(args['user-data-dir'], {
    executablePath: args.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    viewport: { width: 900, height: 600 },
    timeout: timeoutMs,
  })
  report.browser = context.browser()?.version() ?? null
  const page = context.pages()[0] ?? (await context.newPage())
  page.on('console', (message) => report.console.push(`${message.type()}: ${message.text()}`))
  page.on('pageerror', (error) => report.console.push(`pageerror: ${error.message}`))
  page.on('request', (request) => {
    const host = new URL(request.url()).hostname
    if (host !== '127.0.0.1') report.offLoopback.push(request.url())
  })

  await page.goto(args.page)
  await page.waitForFunction(() => window.interopReady === true)
  await page.locator('input.uppy-Dashboard-input[type=file]').first().setInputFiles(args.file)
  await page.locator('.uppy-StatusBar-actionBtn--upload').click()
  await page.waitForFunction(() => window.interopDone !== undefined, null, { timeout: timeoutMs })
  report.done = await page.evaluate(() => window.interopDone)
  // The status bar shows "Complete" once Uppy's state has settled.
  await page.locator('.uppy-StatusBar.is-complete').waitFor({ timeout: 5000 }).catch(() => {})
  await page.screenshot({ path: args.screenshot, fullPage: true })
} catch (error) {
  report.error = String(error?.stack ?? error)
}
await finish(report.done?.successful === 1 && report.error === null ? 0 : INTERRUPTED)
